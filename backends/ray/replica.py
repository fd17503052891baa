"""One Serve replica: a whole lmserve engine, driven through its deployment handle.

The replica builds its backend through the same hooks as ``lmserve serve
api_server`` (a torch engine by default) and runs requests the ingress sends:
:meth:`EngineReplica.generate` streams a request's engine outputs, one list per
engine step, after a first item naming the replica. Only ids cross (an
:class:`~lmserve.core.types.EngineRequest` in, :class:`~lmserve.core.types.EngineOutput`
lists out); text is made at the ingress.

A replica refuses a later turn of an interactive session it does not hold
(:class:`~lmserve.core.types.SessionLostError`): a replica that restarted after a
crash holds none, and the ingress must say the session is lost, not quietly
answer with a history the client did not build on this replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, AsyncIterator

from lmserve.core.output_queues import OutputQueues
from lmserve.core.plugins import call_safely, create_plugin_manager
from lmserve.core.startup import make_backend, resolve_model
from lmserve.core.structured_output import NO_GRAMMAR_ENGINE, OutputGrammar
from lmserve.core.types import EngineRequest, InvalidRequestError, SessionLostError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress needs to know of the engines behind it (the same for all replicas)."""

    max_model_len: int
    eos_token_ids: tuple[int, ...]
    description: str


class EngineReplica:
    """The deployment's class (wrapped by ``serve.deployment`` in :mod:`.deployment`).

    :param config: the :class:`~lmserve.core.config.ServeConfig` fields, ``options``
        a plain dict without the Ray options (the replica builds a local engine).
    """

    def __init__(self, config: dict[str, Any]):
        from ray import serve

        from lmserve.core.config import ServeConfig

        self.config = ServeConfig(**config)
        pm = create_plugin_manager(list(self.config.plugins))
        call_safely(pm, "lmserve_configure", config=self.config)
        model = resolve_model(pm, self.config)
        self.backend = backend = make_backend(pm, self.config, model.source)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # The grammar engine, as the ingress has it (the same plugins): None where there is none.
        self._grammars = call_safely(pm, "lmserve_grammar_compiler", tokenizer=model.tokenizer)
        self._queues = OutputQueues()
        self._sessions: set[str] = set()  # the session keys whose turns this replica ran
        self._started = False
        describe = getattr(backend, "describe", None)
        self._info = ReplicaInfo(backend.max_model_len, tuple(backend.eos_token_ids),
                                 describe() if describe else type(backend).__name__)
        logger.info("Replica %s (pid %d) serves %s.", self.replica_id, os.getpid(), self.config.model)

    # ------------------------------------------------------------------ the calls

    def info(self) -> ReplicaInfo:
        return self._info

    async def generate(self, request: EngineRequest, grammar: OutputGrammar | None = None,
                       continues: bool = False, session_key: str | None = None,
                       replica: str | None = None) -> AsyncIterator[Any]:
        """Run ``request``: first this replica's id, then its outputs, a list per engine step.

        ``grammar``: the request's structured output, compiled here (the constraint
        itself does not cross processes) by the grammar engine of
        :hook:`lmserve_grammar_compiler`. ``continues``: a later turn of the session
        ``request.session_key`` (refused when this replica does not hold it).
        ``session_key`` and ``replica`` are read by the router only.
        """
        key = request.session_key
        if continues and key is not None and key not in self._sessions:
            raise SessionLostError(f"replica {self.replica_id} does not hold it (the replica that did stopped).")
        self._ensure_started()
        if grammar is not None:
            if self._grammars is None:  # the ingress refuses such requests first; this is a guard
                raise InvalidRequestError(f"response_format: {NO_GRAMMAR_ENGINE}.", "response_format")
            request = dataclasses.replace(request, constraint=self._grammars.constraint(grammar))
        queue = self._queues.open(request.request_id)
        if key is not None and request.keep_kv:
            self._sessions.add(key)
        finished = False
        try:
            yield self.replica_id
            self.backend.submit(request)
            while not finished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                finished = batch[-1].finish_reason is not None
                yield batch
        finally:
            self._queues.close(request.request_id)
            if not finished:  # the ingress cancelled: its client left, or a cancel
                self.backend.abort(request.request_id)
            if key is not None and not request.keep_kv:
                self._sessions.discard(key)

    def release_session(self, session_key: str, replica: str | None = None) -> None:
        self._sessions.discard(session_key)
        self.backend.release_session(session_key)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine failed is replaced."""
        if self._started and not self.backend.is_healthy():
            raise RuntimeError(f"the engine of replica {self.replica_id} failed: {self.backend.failure}")

    def __del__(self) -> None:
        if getattr(self, "_started", False):
            self.backend.shutdown()

    # ------------------------------------------------------------------ internals

    def _ensure_started(self) -> None:
        if not self._started:
            self._queues.bind(asyncio.get_running_loop())
            self.backend.start(self._queues.sink)
            self._started = True
