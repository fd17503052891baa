"""The interface every backend implements, and who may call what on it.

The :class:`~lmserve.core.bus.RequestBus` drives a backend: only the bus and its
:class:`~lmserve.core.sessions.SessionManager` call the methods that act on it
(:meth:`~Backend.start`, :meth:`~Backend.submit`, :meth:`~Backend.abort`,
:meth:`~Backend.shutdown`, :meth:`~Backend.release_session`,
:meth:`~Backend.check_session`). Whoever holds the bus may read the backend's
state through ``bus.backend``: :attr:`~Backend.max_model_len`,
:attr:`~Backend.eos_token_ids`, :attr:`~Backend.failure`,
:meth:`~Backend.is_healthy` and :meth:`~Backend.stats` (``/health``, ``/metrics``
and the CLI's exit status do). A rule that combines that state with a request
(the context room, the stop ids) is the bus's: ask it, don't pair the numbers again.
Code that stands where a bus would (a Ray replica's loop, the pytest plugin's
fixture) drives the backend it owns directly, so the torch engine re-checks the
context room and the token ids of every request it is given: its guard for
requests that never met a bus, not a second copy of the rule.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Sequence

from lmserve.core.types import EngineOutput, EngineRequest

OutputSink = Callable[[Sequence[EngineOutput]], None]


@dataclass(frozen=True)
class BackendStats:
    """What a backend reports about its load (zeros where it cannot tell)."""

    num_running: int = 0  # requests being computed
    num_waiting: int = 0  # requests queued for room in the batch or the cache
    kv_cache_usage: float = 0.0  # fraction of the KV cache in use, 0..1
    num_preemptions: int = 0  # since start
    num_kept_sessions: int = 0  # interactive sessions whose KV cache is kept between turns
    kv_cache_written_bytes: int = 0  # KV cache memory written at least once since start, all ranks


class Backend(abc.ABC):
    """An engine that turns token ids into token ids.

    Lifecycle: the backend is built (weights loaded) by
    :hook:`lmserve_make_backend`; the bus calls :meth:`start` once when the
    server's event loop runs; then :meth:`submit` and :meth:`abort` any number
    of times from the event loop; :meth:`shutdown` once at the end.

    The backend steps in its own thread or process and reports every step's
    new tokens through ``sink`` - one call per step, from that thread. Every
    submitted request ends with exactly one output whose ``finish_reason`` is
    set, aborted and failed ones included.
    """

    #: The longest sequence (prompt + output) one request may reach.
    max_model_len: int
    #: Token ids that end a generation unless ``ignore_eos`` is set.
    eos_token_ids: tuple[int, ...]
    #: Why the backend can no longer serve (a fatal error), None while it can and after
    #: a normal shutdown; the server exits non-zero when it is set.
    failure: str | None = None

    @abc.abstractmethod
    def start(self, sink: OutputSink) -> None:
        """Begin stepping; called once, before the first :meth:`submit`."""

    @abc.abstractmethod
    def submit(self, request: EngineRequest) -> None:
        """Queue a request; thread-safe and non-blocking."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request soon; its last output has ``finish_reason`` abort.

        Thread-safe; unknown or already finished ids are ignored.
        """

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Abort everything and stop stepping; called once."""

    def release_session(self, session_key: str) -> None:
        """Free the keys and values kept under ``session_key`` (see
        :attr:`EngineRequest.keep_kv <lmserve.core.types.EngineRequest.keep_kv>`).

        Thread-safe; unknown keys are ignored. A backend that keeps nothing
        between requests needs no override: every turn is then computed whole,
        which is correct, only slower.
        """

    def check_session(self, session_key: str) -> None:
        """Raise :class:`~lmserve.core.types.SessionLostError` when the keys and values kept
        under ``session_key`` can no longer be reached (the engine that held them stopped).

        Called before a session's next turn, from the event loop; it must not block. A
        backend that can recompute a session's history whenever its memory is gone (a
        single engine) needs no override.
        """

    def is_healthy(self) -> bool:
        """True while the backend can step (the engine thread is alive, no :attr:`failure`)."""
        return self.failure is None

    def stats(self) -> BackendStats:
        """A snapshot for ``/metrics``; callable from any thread, cheap."""
        return BackendStats()
