"""Interactive sessions: conversations whose history stays on the server.

A session holds its conversation as token ids, exactly the tokens the model
read and wrote, and the backend keeps their keys and values between turns
(:attr:`EngineRequest.keep_kv <lmserve.core.types.EngineRequest.keep_kv>`),
so a turn computes only its own new tokens. When the backend had to give
that memory up, the next turn sends the same ids and the backend computes
them again: the same tokens come out, only slower.

Rules a client can rely on:

- one turn at a time per session: a second request while a turn runs is
  refused (:class:`SessionBusyError`, a 409 at the HTTP edge);
- ``history_tokens`` is exact: the sum of every earlier turn's input and
  output tokens (the stop token that ended a reply included, since the model
  reads it again on the next turn);
- a cancelled turn keeps what it generated before the cancel;
- a failed turn leaves the history as it was before the turn;
- a session idle for longer than the TTL is ended and its memory freed;
- a session whose keys and values were lost with the engine that held them (a
  replica that stopped) is ended, and its next turn is refused
  (:class:`~lmserve.core.types.SessionLostError`, a 410 at the HTTP edge).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from lmserve.core.types import FinishReason, GenerationOutput, GenerationRequest, SamplingParams, SessionLostError

if TYPE_CHECKING:
    from lmserve.core.bus import RequestBus
    from lmserve.core.structured_output import TokenConstraint

logger = logging.getLogger(__name__)

#: Seconds a cancel waits for the cancelled turn to wind down before answering.
CANCEL_WAIT_S = 5.0


class SessionBusyError(RuntimeError):
    """A turn was asked of a session whose previous turn is still running."""


@dataclass
class Session:
    session_id: int
    #: The conversation so far: every turn's input and output token ids.
    token_ids: list[int] = field(default_factory=list)
    #: The stop token that ended the last reply (EOS or a stop token id), or
    #: None when the reply ended otherwise (length, cancel, a stop string).
    #: Templates use it to tell whether the reply's end-of-turn mark is written.
    closing_token_id: int | None = None
    last_used: float = field(default_factory=time.monotonic)
    running_request_id: str | None = None
    #: Set while no turn runs; a cancel waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Ended while a turn ran: the turn releases the session when it winds down.
    ending: bool = False

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def key(self) -> str:
        """The key the backend keeps this session's keys and values under."""
        return f"session-{self.session_id}"

    @property
    def history_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def busy(self) -> bool:
        return self.running_request_id is not None


class SessionManager:
    """The live sessions of one bus, by client-chosen integer id.

    :param bus: runs the turns and owns the backend whose memory is released.
    :param ttl_s: seconds of idleness after which a session is ended (None or 0: never).
    """

    def __init__(self, bus: RequestBus, ttl_s: float | None = None):
        self.bus = bus
        self.ttl_s = ttl_s or None
        self._sessions: dict[int, Session] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin ending idle sessions (call from the event loop); a no-op without a TTL."""
        if self.ttl_s is not None:
            self._schedule_sweep()

    def stop(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def _schedule_sweep(self) -> None:
        interval = min(max(self.ttl_s / 4, 0.05), 60.0)
        self._sweep_handle = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self.end_idle(time.monotonic())
        self._schedule_sweep()

    def end_idle(self, now: float) -> list[int]:
        """End the sessions idle since before ``now - ttl``; return their ids."""
        if self.ttl_s is None:
            return []
        expired = [s.session_id for s in self._sessions.values()
                   if not s.busy and now - s.last_used > self.ttl_s]
        for session_id in expired:
            logger.info("Session %d was idle for over %g s: ended.", session_id, self.ttl_s)
            self.end(session_id)
        return expired

    # ------------------------------------------------------------------- queries

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def is_live(self, session_id: int) -> bool:
        """Whether ``session_id`` has history or a running turn (other APIs must not reuse it)."""
        session = self._sessions.get(session_id)
        return session is not None and (session.busy or bool(session.token_ids))

    # --------------------------------------------------------------------- turns

    def begin_turn(self, session_id: int) -> Session:
        """The session (new or live), reserved for one turn; :class:`SessionBusyError`
        while another turn of it runs, :class:`SessionLostError` (the session ended) when
        the backend lost its keys and values. Follow with :meth:`run_turn` or :meth:`abandon_turn`."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id)
        if session.busy:
            raise SessionBusyError(
                f"Session {session_id} already has a turn running; wait for it to finish "
                "or cancel it (cancel: true)."
            )
        if session.token_ids:
            self._check_kept(session)
        session.running_request_id = f"session-{session_id}-{uuid.uuid4().hex[:12]}"
        session.idle.clear()
        return session

    def abandon_turn(self, session: Session) -> None:
        """Give back a turn reserved by :meth:`begin_turn` that will not run."""
        self._turn_done(session)

    async def run_turn(self, session: Session, new_token_ids: list[int], params: SamplingParams, *,
                       keep: bool, stop: tuple[str, ...] = (),
                       constraint: TokenConstraint | None = None) -> AsyncIterator[GenerationOutput]:
        """Generate the reply to ``new_token_ids`` after the session's history.

        ``keep``: keep the history (and its keys and values) for the next turn;
        False ends the session after this turn. ``constraint``: the reply's
        structured output. Outputs are the bus's.
        """
        prompt = [*session.token_ids, *new_token_ids]
        generated: list[int] = []
        last: GenerationOutput | None = None
        try:
            request = GenerationRequest(tuple(prompt), params, session.running_request_id, stop,
                                        session_key=session.key, keep_kv=keep, constraint=constraint)
            async for out in self.bus.generate(request):
                if out.finish_reason is FinishReason.ERROR and not generated and session.token_ids:
                    self._check_kept(session)  # failed because the backend lost the session?
                generated.extend(out.token_ids)
                last = out
                yield out
        finally:
            # A turn that was refused, failed, or lost its client before any output
            # leaves the history as it was; one cut short keeps what it sent, like a cancel.
            if last is not None and last.finish_reason is not FinishReason.ERROR:
                session.token_ids = prompt + generated
                session.closing_token_id = self._closing_token(last, generated, params)
            self._turn_done(session, end=not keep or session.ending)

    def cancel(self, session_id: int) -> bool:
        """Stop the running turn of ``session_id``, keeping the history; False when none runs."""
        session = self._sessions.get(session_id)
        if session is None or not session.busy:
            return False
        self.bus.abort(session.running_request_id)
        return True

    async def wait_idle(self, session_id: int, timeout: float = CANCEL_WAIT_S) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            try:
                await asyncio.wait_for(session.idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def end(self, session_id: int) -> bool:
        """End ``session_id`` and free its memory. A running turn is aborted and
        frees it when it winds down (:meth:`wait_idle`). False when there was no such session."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        if session.busy:
            session.ending = True  # the turn releases the session when it winds down
            self.bus.abort(session.running_request_id)
        else:
            self._release(session)
        return True

    # ----------------------------------------------------------------- internals

    def _turn_done(self, session: Session, end: bool = False) -> None:
        session.running_request_id = None
        session.last_used = time.monotonic()
        session.idle.set()
        if end or session.ending or not session.token_ids:
            self._release(session)

    def _check_kept(self, session: Session) -> None:
        """End ``session`` and raise :class:`SessionLostError` when the backend lost its keys and values."""
        try:
            self.bus.backend.check_session(session.key)
        except SessionLostError as exc:
            self._release(session)
            raise SessionLostError(f"Session {session.session_id} was lost: {exc} Its history is gone; "
                                   "start it again (a new turn with this session_id starts afresh).") from exc

    def _release(self, session: Session) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        self.bus.backend.release_session(session.key)

    def _closing_token(self, last: GenerationOutput | None, generated: list[int],
                       params: SamplingParams) -> int | None:
        if last is None or last.finish_reason is not FinishReason.STOP or not generated:
            return None
        return generated[-1] if generated[-1] in params.stop_ids(self.bus.backend.eos_token_ids) else None
