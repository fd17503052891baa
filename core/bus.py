"""The request bus: the one way from a frontend to a backend and back.

It owns request ids, one output queue per request, cancellation (a consumer
that stops listening aborts its request in the backend), the hand-off of
engine outputs from the engine's thread to the asyncio loop
(:class:`~lmserve.core.output_queues.OutputQueues`), and the request
observers. Each request's outputs become text in its own
:class:`~lmserve.core.request_stream.RequestStream`. Frontends call
:meth:`RequestBus.generate` and iterate.

The bus also owns the request rules that need the backend's numbers, so that no
frontend pairs a rule with them again: how much context a request has left
(:meth:`RequestBus.context_room`, :meth:`RequestBus.check_length`) and which ids
end a generation (:meth:`RequestBus.stop_ids`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from typing import AsyncIterator

from lmserve.core.backend import Backend
from lmserve.core.output_queues import OutputQueues
from lmserve.core.request_stream import RequestStream
from lmserve.core.sessions import SessionManager
from lmserve.core.types import (
    BackendUnavailableError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from lmserve.core.validation import check_context_room, context_room

logger = logging.getLogger(__name__)


class RequestBus:
    """Routes requests into a backend and its outputs back to their callers.

    :param backend: the engine. The bus drives it: only the bus (and its
        :class:`~lmserve.core.sessions.SessionManager`) call the methods that act on
        it; whoever holds the bus may read its state through :attr:`backend`
        (the rule is written in :mod:`lmserve.core.backend`).
    :param tokenizer: decodes output ids into text.
    :param hooks: ``pm.hook`` for the request observers, or None.
    :param session_ttl_s: interactive sessions idle this long are ended (None: never).
    """

    def __init__(self, backend: Backend, tokenizer, hooks=None, session_ttl_s: float | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self._hooks = hooks
        self.sessions = SessionManager(self, session_ttl_s)
        self._queues = OutputQueues()
        self._counter = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the backend; call from the event loop that will consume outputs."""
        self._queues.bind(asyncio.get_running_loop())
        self.backend.start(self._queues.sink)
        self.sessions.start()

    def shutdown(self) -> None:
        self.sessions.stop()
        self.backend.shutdown()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---------------------------------------------------------------- the request

    def context_room(self, num_tokens: int) -> int:
        """How many tokens may still be generated after ``num_tokens`` in this backend's
        context (0 or less: none); a frontend with a rule of its own for a full context
        (interactive's ``length`` reply) asks this."""
        return context_room(num_tokens, self.backend.max_model_len)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None,
                     prompt_param: str = "messages") -> int:
        """The ``max_tokens`` to use against this backend's context length
        (:func:`~lmserve.core.validation.check_context_room`); ``None`` means all the room left.

        Frontends ask it before they answer (a refusal is then a status, not a broken
        stream); :meth:`generate` asks it again for callers that did not."""
        return check_context_room(num_prompt_tokens, max_tokens, self.backend.max_model_len, prompt_param)

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end a generation with ``params`` on this backend: its
        ``stop_token_ids`` and, unless ``ignore_eos``, the backend's EOS ids. The one
        place that joins the two (the bus's streams and the sessions' closing token
        ask it)."""
        return params.stop_ids(self.backend.eos_token_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Run ``request``; yield text deltas as they are decoded.

        The last output has ``finish_reason`` set. Stopping the iteration
        early (``aclose()``, task cancellation, a client gone) aborts the
        request in the backend.
        """
        request = self._admit(request)
        request_id = request.request_id
        stream = RequestStream(request, self.tokenizer, self.stop_ids(request.sampling_params))
        queue = self._queues.open(request_id)
        self._observe("lmserve_request_started", request=request)
        try:
            self.backend.submit(request.engine_request())
            while not stream.finished:
                engine_output = await queue.get()
                output = stream.push(engine_output)
                if stream.finished and engine_output.finish_reason is None:  # a stop string matched
                    self.backend.abort(request_id)  # its abort output finds no queue
                if output is not None:
                    yield output
        finally:
            self._queues.close(request_id)
            if not stream.finished:
                self.backend.abort(request_id)
                stream.abandoned()
            self._observe("lmserve_request_finished", request=request, output=stream.last,
                          elapsed_s=time.monotonic() - stream.clock.arrival)

    def _admit(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its id assigned, once the bus and the backend can take it."""
        if not self._queues.bound:
            raise RuntimeError("RequestBus.start() has not been called.")
        if not self.backend.is_healthy():
            raise BackendUnavailableError("The engine is not running; no request can be served.")
        self.check_length(len(request.prompt_token_ids), request.sampling_params.max_tokens)
        if not request.request_id:
            return dataclasses.replace(request, request_id=f"{self._prefix}-{next(self._counter)}")
        if request.request_id in self._queues:
            raise InvalidRequestError(f"Request id {request.request_id!r} is already in use.", "request_id")
        return request

    def abort(self, request_id: str) -> None:
        """Stop a running request from outside its consumer (a cancel); the
        consumer's iteration ends with ``finish_reason`` abort."""
        if request_id in self._queues:
            self.backend.abort(request_id)

    def _observe(self, hook_name: str, **kwargs) -> None:
        if self._hooks is None:
            return
        try:
            getattr(self._hooks, hook_name)(**kwargs)
        except Exception:
            logger.exception("A %s observer raised; the request goes on.", hook_name)
