"""The ingress's backend: requests go to engine replicas through a Serve deployment handle.

To the bus this is one more :class:`~lmserve.core.backend.Backend`; each
submitted request becomes a streaming call of
:meth:`EngineReplica.generate <lmserve.backends.ray.replica.EngineReplica.generate>`,
routed by :class:`~lmserve.backends.ray.router.SessionAffinityRouter`.

Interactive sessions keep their history at the ingress (the bus's session
manager, as on one machine) and their keys and values on one replica. This
backend remembers which replica that is, from the first item of the session's
first turn, and pins every later turn to it. When that replica is gone (the
router no longer sees it, or a call to it failed), the session is lost: its next
turn is refused (:meth:`check_session`), never quietly served elsewhere.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from lmserve.core.backend import Backend, BackendStats, OutputSink
from lmserve.core.types import EngineOutput, EngineRequest, FinishReason, SessionLostError
from lmserve.backends.ray import live_replicas
from lmserve.backends.ray.router import PINNED_REPLICA, SESSION_KEY

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from lmserve.backends.ray.replica import ReplicaInfo

logger = logging.getLogger(__name__)

#: The replica ids that served the requests of the HTTP request being handled; the
#: ingress's middleware sets a fresh list per HTTP request and names them in a header.
request_replicas: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "lmserve_request_replicas", default=None)


class ServeBackend(Backend):
    """A :class:`Backend` whose engines are the replicas behind ``handle``.

    :param handle: the engine deployment's handle.
    :param info: what the replicas report of their engine.
    """

    def __init__(self, handle: DeploymentHandle, info: ReplicaInfo):
        self.handle = handle
        self.deployment = handle.deployment_name
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self.description = info.description
        self._sink: OutputSink | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._holders: dict[str, str] = {}  # session key -> the replica that holds its keys and values
        self._lost: dict[str, str] = {}  # session key -> why it was lost

    def describe(self) -> str:
        return f"Ray Serve deployment {self.deployment!r}; each replica: {self.description}"

    # ------------------------------------------------------------------ lifecycle

    def start(self, sink: OutputSink) -> None:
        self._sink = sink

    def submit(self, request: EngineRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._run(request, request_replicas.get()))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda done: self._cancelled_before_start(request, done))

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    # ------------------------------------------------------------------ sessions

    def check_session(self, session_key: str) -> None:
        if session_key in self._lost:
            raise SessionLostError(self._lost.pop(session_key))
        holder = self._holders.get(session_key)
        live = live_replicas.of(self.deployment)
        if holder is not None and live is not None and holder not in live:
            del self._holders[session_key]
            raise SessionLostError(f"replica {holder}, which held it, stopped.")

    def release_session(self, session_key: str) -> None:
        self._lost.pop(session_key, None)
        holder = self._holders.pop(session_key, None)
        if holder is not None and holder in (live_replicas.of(self.deployment) or ()):
            self.handle.release_session.remote(session_key, replica=holder)

    def stats(self) -> BackendStats:
        """What this ingress sees: its requests in flight, the sessions it placed."""
        return BackendStats(num_running=len(self._tasks), num_kept_sessions=len(self._holders))

    # ------------------------------------------------------------------ internals

    async def _run(self, request: EngineRequest, replicas: list[str] | None) -> None:
        """Stream ``request`` from a replica into the sink; end it with one finish output."""
        key = request.session_key
        holder = self._holders.get(key) if key is not None else None
        grammar = getattr(request.constraint, "grammar", None)
        remote = request if request.constraint is None else dataclasses.replace(request, constraint=None)
        stream = self.handle.options(stream=True).generate.remote(
            remote, grammar=grammar, continues=holder is not None,
            **{SESSION_KEY: key, PINNED_REPLICA: holder})
        replica = None
        finished = False
        started = time.monotonic()
        try:
            async for item in stream:
                if replica is None:  # the first item names the replica
                    replica = item
                    if replicas is not None:
                        replicas.append(replica)
                    if key is not None and request.keep_kv:
                        self._holders[key] = replica
                    continue
                finished = item[-1].finish_reason is not None
                self._sink(item)
        except asyncio.CancelledError:  # an abort: the replica's engine stops the request too
            stream.cancel()
            self._finish(request, FinishReason.ABORT)
            finished = True
        except SessionLostError as exc:
            self._lose(key, _first_line(exc))
            self._finish(request, FinishReason.ERROR, f"The session was lost: {_first_line(exc)}")
            finished = True
        except Exception as exc:  # the replica died, or failed the call
            logger.warning("Request %s failed on replica %s after %.1f s: %s", request.request_id,
                           replica or "(not yet routed)", time.monotonic() - started, exc)
            if key is not None and (holder is not None or request.keep_kv):
                self._lose(key, f"replica {replica or holder}, which held it, failed: {_first_line(exc)}")
            message = f"The replica serving this request failed: {type(exc).__name__}: {_first_line(exc)}"
            self._finish(request, FinishReason.ERROR, message)
            finished = True
        finally:
            self._tasks.pop(request.request_id, None)
            if not finished:
                self._finish(request, FinishReason.ERROR, "The replica's stream ended without a finish.")

    def _cancelled_before_start(self, request: EngineRequest, task: asyncio.Task) -> None:
        """An abort that came before :meth:`_run` began (it ends every request it runs)."""
        if task.cancelled():
            self._tasks.pop(request.request_id, None)
            self._finish(request, FinishReason.ABORT)

    def _finish(self, request: EngineRequest, reason: FinishReason, error: str | None = None) -> None:
        self._sink([EngineOutput(request.request_id, (), reason, error)])

    def _lose(self, key: str | None, why: str) -> None:
        if key is not None:
            self._holders.pop(key, None)
            self._lost[key] = why


def _first_line(exc: BaseException) -> str:
    """The gist of an error a replica raised (Ray wraps it with the remote traceback)."""
    exc = getattr(exc, "cause", None) or exc
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
