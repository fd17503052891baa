"""The request bus: the one way from a frontend to a backend and back.

It owns request ids, one output queue per request, cancellation (a consumer
that stops listening aborts its request in the backend), the hand-off of
engine outputs from the engine's thread to the asyncio loop, and the
detokenize stage. Frontends call :meth:`RequestBus.generate` and iterate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from typing import AsyncIterator, Sequence

from lmserve.core.backend import Backend
from lmserve.core.detokenizer import IncrementalDetokenizer
from lmserve.core.sessions import SessionManager
from lmserve.core.types import (
    BackendUnavailableError,
    EngineOutput,
    EngineRequest,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    RequestTiming,
    TokenLogprob,
    Usage,
)
from lmserve.core.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)


class RequestBus:
    """Routes requests into a backend and its outputs back to their callers.

    :param backend: the engine; the bus is its only caller.
    :param tokenizer: decodes output ids into text.
    :param hooks: ``pm.hook`` for the request observers, or None.
    :param session_ttl_s: interactive sessions idle this long are ended (None: never).
    """

    def __init__(self, backend: Backend, tokenizer, hooks=None, session_ttl_s: float | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self._hooks = hooks
        self.sessions = SessionManager(self, session_ttl_s)
        self._queues: dict[str, asyncio.Queue[EngineOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counter = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the backend; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self.backend.start(self._on_engine_outputs)
        self.sessions.start()

    def shutdown(self) -> None:
        self.sessions.stop()
        self.backend.shutdown()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---------------------------------------------------------------- the request

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The ``max_tokens`` to use, or a clear error when the prompt does not fit.

        ``None`` means all the room left in the context.
        """
        limit = self.backend.max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidRequestError(
                f"The prompt has {num_prompt_tokens} tokens, but this model's maximum context "
                f"length is {limit} tokens, which leaves no room to generate.",
                "messages",
            )
        room = limit - num_prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. You requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                "max_tokens",
            )
        return max_tokens

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Run ``request``; yield text deltas as they are decoded.

        The last output has ``finish_reason`` set. Stopping the iteration
        early (``aclose()``, task cancellation, a client gone) aborts the
        request in the backend.
        """
        if self._loop is None:
            raise RuntimeError("RequestBus.start() has not been called.")
        if not self.backend.is_healthy():
            raise BackendUnavailableError("The engine is not running; no request can be served.")
        params = request.sampling_params
        self.check_length(len(request.prompt_token_ids), params.max_tokens)
        request_id = request.request_id or f"{self._prefix}-{next(self._counter)}"
        if request_id in self._queues:
            raise InvalidRequestError(f"Request id {request_id!r} is already in use.", "request_id")
        if not request.request_id:
            request = dataclasses.replace(request, request_id=request_id)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.backend.eos_token_ids)
        stop_strings = (
            StopStringMatcher(request.stop, request.include_stop_str_in_output) if request.stop else None
        )

        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        num_prompt = len(request.prompt_token_ids)
        num_output = 0
        started = time.monotonic()
        first_token: float | None = None
        previous = started
        gaps: list[float] = []
        last: GenerationOutput | None = None
        # Ids (and their logprobs) whose text is still held back ride with the next text.
        pending_ids: tuple[int, ...] = ()
        pending_logprobs: tuple[TokenLogprob, ...] | None = () if params.logprobs is not None else None
        prompt_logprobs = None  # from the engine's first output until yielded
        self._observe("lmserve_request_started", request=request)
        try:
            self.backend.submit(EngineRequest(request_id, request.prompt_token_ids, params,
                                              request.session_key, request.keep_kv))
            while True:
                out = await queue.get()
                if out.new_token_ids:
                    now = time.monotonic()
                    if first_token is None:
                        first_token = now
                    else:
                        gaps.append(now - previous)
                    previous = now
                num_output += len(out.new_token_ids)
                finish_reason = out.finish_reason
                text_ids = out.new_token_ids
                if finish_reason is FinishReason.STOP and text_ids and text_ids[-1] in stop_ids:
                    text_ids = text_ids[:-1]  # the stop token itself is not text
                text = detokenizer.push(text_ids)
                if finish_reason is not None:
                    text += detokenizer.flush()
                if stop_strings is not None:
                    text, matched = stop_strings.push(text, can_stop=num_output >= params.min_tokens)
                    if matched:
                        if finish_reason is None:
                            self.backend.abort(request_id)  # its abort output finds no queue
                        finish_reason = FinishReason.STOP
                    elif finish_reason is not None:
                        text += stop_strings.flush()
                pending_ids += out.new_token_ids
                if pending_logprobs is not None:
                    pending_logprobs += out.logprobs or ()
                if out.prompt_logprobs is not None:
                    prompt_logprobs = out.prompt_logprobs
                usage = Usage(num_prompt, num_output, out.num_cached_tokens)
                timing = None
                if finish_reason is not None:
                    timing = RequestTiming(started, first_token, time.monotonic(), tuple(gaps))
                last = GenerationOutput(
                    request_id, text, pending_ids, usage, finish_reason, out.error,
                    timing=timing, logprobs=pending_logprobs, prompt_logprobs=prompt_logprobs,
                )
                if finish_reason is not None:
                    yield last
                    return
                if text:  # no empty deltas
                    pending_ids = ()
                    if pending_logprobs is not None:
                        pending_logprobs = ()
                    prompt_logprobs = None
                    yield last
        finally:
            del self._queues[request_id]
            if last is None or last.finish_reason is None:
                self.backend.abort(request_id)
                timing = RequestTiming(started, first_token, time.monotonic(), tuple(gaps))
                last = GenerationOutput(
                    request_id, "", (), Usage(num_prompt, num_output), FinishReason.ABORT, timing=timing
                )
            self._observe(
                "lmserve_request_finished",
                request=request,
                output=last,
                elapsed_s=time.monotonic() - started,
            )

    def abort(self, request_id: str) -> None:
        """Stop a running request from outside its consumer (a cancel); the
        consumer's iteration ends with ``finish_reason`` abort."""
        if request_id in self._queues:
            self.backend.abort(request_id)

    # ------------------------------------------------------------- engine -> loop

    def _on_engine_outputs(self, outputs: Sequence[EngineOutput]) -> None:
        """Called from the engine's thread once per step."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._dispatch, outputs)
            except RuntimeError:  # the loop closed in between: shutting down
                pass

    def _dispatch(self, outputs: Sequence[EngineOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:  # None: the consumer already left
                queue.put_nowait(out)

    def _observe(self, hook_name: str, **kwargs) -> None:
        if self._hooks is None:
            return
        try:
            getattr(self._hooks, hook_name)(**kwargs)
        except Exception:
            logger.exception("A %s observer raised; the request goes on.", hook_name)
