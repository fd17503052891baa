"""The session rules, against a fake bus: history, busy, refusals, endings, the TTL."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from lmserve.core.sessions import (
    NO_LIMITS,
    RESERVED_ID_BOUND,
    SessionBusyError,
    SessionLimitError,
    SessionLimits,
    SessionManager,
)
from lmserve.core.types import (
    FinishReason,
    GenerationOutput,
    InvalidRequestError,
    SamplingParams,
    SessionLostError,
    TokenUsage,
)

EOS = 2
PARAMS = SamplingParams(max_tokens=8)


class FakeBus:
    """Answers every turn with ``outputs`` (or raises ``error``), recording requests."""

    def __init__(self, outputs=(), error=None):
        self.outputs, self.error = list(outputs), error
        self.requests, self.aborted, self.released = [], [], []
        self.lost = {}  # session key -> why the backend lost it
        self.backend = SimpleNamespace(eos_token_ids=(EOS,), release_session=self.released.append,
                                       check_session=self.check_session)

    def stop_ids(self, params):
        return params.stop_ids(self.backend.eos_token_ids)

    def check_session(self, key):
        if key in self.lost:
            raise SessionLostError(self.lost[key])

    async def generate(self, request):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        for out in self.outputs:
            yield out

    def abort(self, request_id):
        self.aborted.append(request_id)


def output(ids, reason=None):
    return GenerationOutput("r", "", tuple(ids), TokenUsage(0, 0), reason)


def run(sessions, session_id, new_ids, keep=True, owner=None, client=None, limits=NO_LIMITS, **kwargs):
    async def go():
        session = sessions.begin_turn(session_id, owner=owner, client=client, keep=keep, limits=limits)
        return [out async for out in sessions.run_turn(session, new_ids, PARAMS, keep=keep, **kwargs)]

    return asyncio.run(go())


def test_history_is_every_turns_input_and_output_and_the_prompt_carries_it():
    bus = FakeBus([output([7, 8]), output([EOS], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5, 6])
    run(sessions, 1, [9])
    assert sessions.get(1).token_ids == [5, 6, 7, 8, EOS, 9, 7, 8, EOS]
    assert bus.requests[1].prompt_token_ids == (5, 6, 7, 8, EOS, 9)
    assert bus.requests[1].session_key == "session-1" and bus.requests[1].keep_kv
    assert sessions.get(1).closing_token_id == EOS, "the reply ended on its stop token"


def test_a_reply_cut_by_length_has_no_closing_token():
    sessions = SessionManager(FakeBus([output([7, 8], FinishReason.LENGTH)]))
    run(sessions, 1, [5])
    assert sessions.get(1).closing_token_id is None


def test_a_second_turn_while_one_runs_is_refused():
    sessions = SessionManager(FakeBus())
    sessions.begin_turn(1)
    with pytest.raises(SessionBusyError):
        sessions.begin_turn(1)


@pytest.mark.parametrize("error", [InvalidRequestError("no room", "max_tokens"), RuntimeError("engine gone")])
def test_a_refused_turn_frees_the_session_and_leaves_its_history(error):
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5])
    bus.error = error
    with pytest.raises(type(error)):
        run(sessions, 1, [6])
    assert sessions.get(1).token_ids == [5, 7] and not sessions.get(1).busy
    bus.error = None
    run(sessions, 1, [6])
    assert sessions.get(1).token_ids == [5, 7, 6, 7]


def test_an_invalid_stop_string_is_refused_without_leaving_the_session_busy():
    sessions = SessionManager(FakeBus([output([7], FinishReason.STOP)]))
    with pytest.raises(InvalidRequestError):
        run(sessions, 1, [5], stop=("",))
    assert sessions.get(1) is None, "a new session that never ran is dropped"
    run(sessions, 1, [5])
    assert sessions.get(1).token_ids == [5, 7]


def test_a_failed_turn_leaves_the_history_as_it_was():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5])
    bus.outputs = [output([], FinishReason.ERROR)]
    run(sessions, 1, [6])
    assert sessions.get(1).token_ids == [5, 7]


def test_a_turn_without_keep_ends_the_session_and_frees_its_memory():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5], keep=False)
    assert sessions.get(1) is None and bus.released == ["session-1"]


def test_ending_a_busy_session_aborts_its_turn_and_frees_it_when_the_turn_winds_down():
    bus = FakeBus([output([7], FinishReason.ABORT)])
    sessions = SessionManager(bus)

    async def go():
        session = sessions.begin_turn(1)
        assert sessions.end(1) and bus.aborted == [session.running_request_id]
        assert sessions.get(1) is session and bus.released == [], "not while the turn runs"
        [out async for out in sessions.run_turn(session, [5], PARAMS, keep=True)]

    asyncio.run(go())
    assert sessions.get(1) is None and bus.released == ["session-1"]


def test_idle_sessions_are_ended_after_the_ttl_busy_ones_are_not():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus, ttl_s=10)
    run(sessions, 1, [5])
    run(sessions, 2, [5])
    sessions.begin_turn(2)
    now = sessions.get(1).last_used
    assert sessions.end_idle(now + 5) == []
    assert sessions.end_idle(now + 11) == [1]
    assert bus.released == ["session-1"] and sessions.get(2) is not None


def test_a_session_the_backend_lost_is_ended_and_its_next_turn_refused():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5])
    run(sessions, 2, [5])
    bus.lost["session-1"] = "replica r1, which held it, stopped."
    with pytest.raises(SessionLostError, match="Session 1 was lost: replica r1, which held it, stopped"):
        sessions.begin_turn(1)
    assert sessions.get(1) is None and "session-1" in bus.released
    run(sessions, 2, [6])  # the other session goes on
    assert sessions.get(2).token_ids == [5, 7, 6, 7]
    del bus.lost["session-1"]
    run(sessions, 1, [9])  # the id starts afresh
    assert bus.requests[-1].prompt_token_ids == (9,)


def test_a_turn_that_fails_because_the_session_was_lost_raises_and_ends_it():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5])

    async def fail_and_lose(request):  # the backend finds out during the turn
        bus.lost["session-1"] = "replica r2 does not hold it."
        yield output([], FinishReason.ERROR)

    bus.generate = fail_and_lose
    with pytest.raises(SessionLostError, match="Session 1 was lost: replica r2 does not hold it"):
        run(sessions, 1, [6])
    assert sessions.get(1) is None


def test_a_failed_turn_of_a_kept_session_is_an_error_output_not_a_loss():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 1, [5])
    bus.outputs = [output([], FinishReason.ERROR)]
    assert run(sessions, 1, [6])[-1].finish_reason is FinishReason.ERROR
    assert sessions.get(1).token_ids == [5, 7], "a failed turn leaves the history"


# ------------------------------------------------------------------ owners and limits


def test_two_owners_sessions_of_one_id_are_two_sessions_with_separate_kv():
    bus = FakeBus([output([7], FinishReason.STOP)])
    sessions = SessionManager(bus)
    run(sessions, 31337, [5, 6], owner="key-1")
    run(sessions, 31337, [9], owner="key-2")
    assert sessions.get(31337, owner="key-1").token_ids == [5, 6, 7]
    assert sessions.get(31337, owner="key-2").token_ids == [9, 7], "key-2 started afresh"
    assert bus.requests[1].prompt_token_ids == (9,)
    assert [request.session_key for request in bus.requests] == ["session-key-1-31337", "session-key-2-31337"]
    assert sessions.get(31337) is None and not sessions.is_live(31337), "the keyless namespace is another"
    assert not sessions.cancel(31337, owner="key-3") and not sessions.end(31337, owner="key-3")
    assert sessions.end(31337, owner="key-2") and bus.released == ["session-key-2-31337"]
    assert sessions.get(31337, owner="key-1").token_ids == [5, 6, 7]


def test_a_client_opens_no_more_sessions_than_its_limit_and_ending_one_makes_room():
    sessions = SessionManager(FakeBus([output([7], FinishReason.STOP)]))
    limits = SessionLimits(max_sessions=2)
    run(sessions, 1, [5], client="a", limits=limits)
    run(sessions, 2, [5], client="a", limits=limits)
    with pytest.raises(SessionLimitError, match="--max-sessions-per-client"):
        run(sessions, 3, [5], client="a", limits=limits)
    assert sessions.get(3) is None, "the refused session was not opened"
    with pytest.raises(SessionLimitError):
        sessions.reserve(client="a", limits=limits)
    run(sessions, 1, [6], client="a", limits=limits)  # a live session goes on
    run(sessions, 3, [5], keep=False, client="a", limits=limits)  # ends after its turn: opens nothing
    run(sessions, 4, [5], client="b", limits=limits)  # another client's room is its own
    sessions.end(2)
    run(sessions, 3, [5], client="a", limits=limits)
    assert sessions.num_sessions("a") == 2 and sessions.num_sessions("b") == 1


def test_a_running_turn_that_keeps_its_new_session_counts_one_that_ends_it_does_not():
    sessions = SessionManager(FakeBus())
    limits = SessionLimits(max_sessions=1)
    sessions.begin_turn(1, client="a", keep=False, limits=limits)
    assert sessions.num_sessions("a") == 0
    sessions.begin_turn(2, client="a", keep=True, limits=limits)
    assert sessions.num_sessions("a") == 1
    with pytest.raises(SessionLimitError):
        sessions.begin_turn(3, client="a", limits=limits)


def test_a_reserved_session_has_an_unguessable_id_lives_empty_and_ends_with_the_ttl():
    bus = FakeBus([output([], FinishReason.ERROR)])
    sessions = SessionManager(bus, ttl_s=10)
    reserved = [sessions.reserve(owner="key-1", client="key-1") for _ in range(20)]
    ids = {session.session_id for session in reserved}
    assert len(ids) == 20 and all(0 < session_id < RESERVED_ID_BOUND for session_id in ids)
    first = reserved[0].session_id
    assert sessions.is_live(first, owner="key-1") and not sessions.is_live(first, owner="key-2")
    assert sessions.num_sessions("key-1") == 20
    run(sessions, first, [5], owner="key-1")  # a failed first turn: still reserved
    sessions.abandon_turn(sessions.begin_turn(first, owner="key-1"))
    assert sessions.get(first, owner="key-1") is not None
    assert len(sessions.end_idle(time.monotonic() + 11)) == 20 and len(sessions) == 0


def test_the_token_limit_counts_history_and_running_turns_and_cuts_the_reply():
    sessions = SessionManager(FakeBus([output([7, 8], FinishReason.LENGTH)]))
    limits = SessionLimits(max_tokens=10)
    run(sessions, 1, [1, 2, 3], client="a")  # 5 tokens of history
    second = sessions.begin_turn(2, client="a")
    assert sessions.reserve_tokens(second, 2, 100, limits) == 3, "the reply gets what the limit leaves"
    assert sessions.num_tokens("a") == 10
    third = sessions.begin_turn(3, client="a")
    with pytest.raises(SessionLimitError, match="--max-session-tokens-per-client"):
        sessions.reserve_tokens(third, 1, 0, limits)
    sessions.abandon_turn(third)
    sessions.abandon_turn(second)
    assert sessions.num_tokens("a") == 5, "a turn done holds no room"
    assert sessions.reserve_tokens(sessions.begin_turn(1, client="a"), 5, 100, limits) == 0
    assert sessions.reserve_tokens(sessions.begin_turn(4, client="b"), 2, 100, limits) == 8, "per client"

