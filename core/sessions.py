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

Owners and clients. Every session has an owner: the tag of the API key that
opened it (``key-1`` for the first of ``--api-keys``), or None on a server
without keys. Sessions are kept by (owner, session id): a key sees only its own,
and the same integer under two keys names two sessions whose keys and values
never meet (the backend key carries the owner). Without keys there is one
namespace and an id protects nothing: whoever names it uses it. :meth:`SessionManager.reserve`
makes an id nobody chose, random in [1, 2**53).

Every session also counts toward a client (its owner's tag with keys, else the
address that opened it), whose live sessions and their tokens of history are
bounded by :class:`SessionLimits` (:class:`SessionLimitError`, a 429 at the HTTP
edge). A turn that ends its session after itself (``keep=False``) on a new id,
like a one-shot request, never opens a session to count.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
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
#: Ids made by :meth:`SessionManager.reserve` lie in [1, RESERVED_ID_BOUND): 53 bits of
#: chance, and exact as JavaScript numbers.
RESERVED_ID_BOUND = 2**53

#: A session's place in the manager: (owner, session id).
SessionKey = tuple["str | None", int]


class SessionBusyError(RuntimeError):
    """A turn was asked of a session whose previous turn is still running."""


class SessionLimitError(RuntimeError):
    """A client asked for more live sessions, or more tokens of session history, than it may hold."""


@dataclass(frozen=True)
class SessionLimits:
    """What one client's live sessions may hold together; 0: no limit.

    The HTTP frontend builds it from ``--max-sessions-per-client`` and
    ``--max-session-tokens-per-client``.
    """

    max_sessions: int = 0
    #: Tokens of history (the keys and values kept between turns), a running turn's
    #: input and most output included.
    max_tokens: int = 0


NO_LIMITS = SessionLimits()


@dataclass
class Session:
    session_id: int
    #: The tag of the API key that opened it; None on a server without keys.
    owner: str | None = None
    #: Whose limits it counts toward: the owner's tag, or the address that opened it.
    client: str | None = None
    #: Made by :meth:`SessionManager.reserve`: kept while it has no history yet.
    reserved: bool = False
    #: The conversation so far: every turn's input and output token ids.
    token_ids: list[int] = field(default_factory=list)
    #: The stop token that ended the last reply (EOS or a stop token id), or
    #: None when the reply ended otherwise (length, cancel, a stop string).
    #: Templates use it to tell whether the reply's end-of-turn mark is written.
    closing_token_id: int | None = None
    last_used: float = field(default_factory=time.monotonic)
    running_request_id: str | None = None
    #: Whether the running turn keeps the session after itself.
    turn_keeps: bool = True
    #: Tokens the running turn may add to the history (its input and most output),
    #: held against the client's token limit until the turn is done.
    pending_tokens: int = 0
    #: Set while no turn runs; a cancel waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Ended while a turn ran: the turn releases the session when it winds down.
    ending: bool = False

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def key(self) -> str:
        """The key the backend keeps this session's keys and values under (the owner's
        tag in it: two owners' sessions of one id never share them)."""
        if self.owner is None:
            return f"session-{self.session_id}"
        return f"session-{self.owner}-{self.session_id}"

    @property
    def history_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def busy(self) -> bool:
        return self.running_request_id is not None

    @property
    def counted(self) -> bool:
        """Whether it counts toward its client's sessions: it has history, was reserved,
        or runs a turn that keeps it (a turn that ends it after itself opens nothing)."""
        return bool(self.token_ids) or self.reserved or (self.busy and self.turn_keeps)

    def describe(self) -> str:
        """How logs name it: its id and owner's tag (never an API key)."""
        return f"Session {self.session_id}" + (f" of {self.owner}" if self.owner is not None else "")


class SessionManager:
    """The live sessions of one bus, by owner and integer id.

    :param bus: runs the turns and owns the backend whose memory is released.
    :param ttl_s: seconds of idleness after which a session is ended (None or 0: never).

    Every method takes the ``owner`` whose namespace it looks in (None: the shared
    one of a server without keys); a session of another owner does not exist for it.
    """

    def __init__(self, bus: RequestBus, ttl_s: float | None = None):
        self.bus = bus
        self.ttl_s = ttl_s or None
        self._sessions: dict[SessionKey, Session] = {}
        #: The keys of each client's sessions, so that its limits are counted without a scan.
        self._by_client: dict[str | None, set[SessionKey]] = {}
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
        expired = [s for s in self._sessions.values() if not s.busy and now - s.last_used > self.ttl_s]
        for session in expired:
            logger.info("%s was idle for over %g s: ended.", session.describe(), self.ttl_s)
            self._end(session)
        return [session.session_id for session in expired]

    # ------------------------------------------------------------------- queries

    def get(self, session_id: int, *, owner: str | None = None) -> Session | None:
        return self._sessions.get((owner, session_id))

    def __len__(self) -> int:
        return len(self._sessions)

    def is_live(self, session_id: int, *, owner: str | None = None) -> bool:
        """Whether ``owner``'s ``session_id`` has history, a running turn, or was reserved
        (other APIs must not reuse it)."""
        session = self._sessions.get((owner, session_id))
        return session is not None and (session.busy or bool(session.token_ids) or session.reserved)

    def num_sessions(self, client: str | None) -> int:
        """The sessions that count toward ``client``'s limit (:attr:`Session.counted`)."""
        return sum(1 for session in self._of_client(client) if session.counted)

    def num_tokens(self, client: str | None) -> int:
        """Tokens of ``client``'s sessions: their history, and what their running turns may add."""
        return sum(session.history_tokens + session.pending_tokens for session in self._of_client(client))

    # --------------------------------------------------------------------- turns

    def reserve(self, *, owner: str | None = None, client: str | None = None,
                limits: SessionLimits = NO_LIMITS) -> Session:
        """A new, empty session under an id nobody chose (random, unused by ``owner``);
        :class:`SessionLimitError` when ``client`` holds all the sessions it may.
        It lives, and counts, until it is ended or idle past the TTL."""
        self._check_room(client, limits)
        while True:
            session_id = 1 + secrets.randbelow(RESERVED_ID_BOUND - 1)
            if (owner, session_id) not in self._sessions:
                break
        return self._add(Session(session_id, owner, client, reserved=True))

    def begin_turn(self, session_id: int, *, owner: str | None = None, client: str | None = None,
                   keep: bool = True, limits: SessionLimits = NO_LIMITS) -> Session:
        """``owner``'s session (new or live), reserved for one turn; :class:`SessionBusyError`
        while another turn of it runs, :class:`SessionLostError` (the session ended) when
        the backend lost its keys and values, :class:`SessionLimitError` when the turn
        would open a session (``keep``: it keeps the session after itself) beyond
        ``client``'s limit. Follow with :meth:`run_turn` or :meth:`abandon_turn`."""
        session = self._sessions.get((owner, session_id))
        if session is None:
            if keep:
                self._check_room(client, limits)
            session = self._add(Session(session_id, owner, client))
        if session.busy:
            raise SessionBusyError(
                f"Session {session_id} already has a turn running; wait for it to finish "
                "or cancel it (cancel: true)."
            )
        if session.token_ids:
            self._check_kept(session)
        session.running_request_id = f"session-{session_id}-{uuid.uuid4().hex[:12]}"
        session.turn_keeps = keep
        session.idle.clear()
        return session

    def reserve_tokens(self, session: Session, num_input_tokens: int, max_output_tokens: int,
                       limits: SessionLimits = NO_LIMITS) -> int:
        """Hold room under the client's token limit for a turn of ``session`` (begun):
        its ``num_input_tokens`` and up to ``max_output_tokens``. Returns the most tokens
        the reply may have: ``max_output_tokens``, or less where the limit leaves less.
        :class:`SessionLimitError` when the history and input alone pass the limit.
        The room is held until the turn is done."""
        if not limits.max_tokens:
            return max_output_tokens
        others = self.num_tokens(session.client) - session.history_tokens - session.pending_tokens
        needed = others + session.history_tokens + num_input_tokens
        if needed > limits.max_tokens:
            raise SessionLimitError(
                f"This turn would bring this client's interactive sessions to {needed} tokens of history, "
                f"more than the {limits.max_tokens} allowed (--max-session-tokens-per-client); "
                "end a session to make room."
            )
        output_tokens = min(max_output_tokens, limits.max_tokens - needed)
        session.pending_tokens = num_input_tokens + output_tokens
        return output_tokens

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

    def cancel(self, session_id: int, *, owner: str | None = None) -> bool:
        """Stop the running turn of ``owner``'s ``session_id``, keeping the history; False when none runs."""
        session = self._sessions.get((owner, session_id))
        if session is None or not session.busy:
            return False
        self.bus.abort(session.running_request_id)
        return True

    async def wait_idle(self, session_id: int, timeout: float = CANCEL_WAIT_S, *,
                        owner: str | None = None) -> None:
        session = self._sessions.get((owner, session_id))
        if session is not None:
            try:
                await asyncio.wait_for(session.idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def end(self, session_id: int, *, owner: str | None = None) -> bool:
        """End ``owner``'s ``session_id`` and free its memory. A running turn is aborted and
        frees it when it winds down (:meth:`wait_idle`). False when there was no such session."""
        session = self._sessions.get((owner, session_id))
        if session is None:
            return False
        self._end(session)
        return True

    # ----------------------------------------------------------------- internals

    def _add(self, session: Session) -> Session:
        key = (session.owner, session.session_id)
        self._sessions[key] = session
        self._by_client.setdefault(session.client, set()).add(key)
        return session

    def _of_client(self, client: str | None) -> list[Session]:
        return [self._sessions[key] for key in self._by_client.get(client, ())]

    def _check_room(self, client: str | None, limits: SessionLimits) -> None:
        """:class:`SessionLimitError` when ``client`` holds all the sessions it may."""
        if limits.max_sessions and self.num_sessions(client) >= limits.max_sessions:
            raise SessionLimitError(
                f"This client holds {limits.max_sessions} live interactive sessions, the most allowed "
                "(--max-sessions-per-client); end one (or let it expire) before opening another."
            )

    def _end(self, session: Session) -> None:
        if session.busy:
            session.ending = True  # the turn releases the session when it winds down
            self.bus.abort(session.running_request_id)
        else:
            self._release(session)

    def _turn_done(self, session: Session, end: bool = False) -> None:
        session.running_request_id = None
        session.pending_tokens = 0
        session.last_used = time.monotonic()
        session.idle.set()
        if end or session.ending or not (session.token_ids or session.reserved):
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
        key = (session.owner, session.session_id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
            keys = self._by_client.get(session.client)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_client[session.client]
        self.bus.backend.release_session(session.key)

    def _closing_token(self, last: GenerationOutput | None, generated: list[int],
                       params: SamplingParams) -> int | None:
        if last is None or last.finish_reason is not FinishReason.STOP or not generated:
            return None
        return generated[-1] if generated[-1] in self.bus.stop_ids(params) else None
