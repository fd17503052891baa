"""Interactive sessions against hostile clients: owners, server-made ids, per-client limits.

The reproductions: with ``--api-keys k1 k2``, k2 continued k1's session 31337 and read
its secret, then ended it; a chat request naming a live session answered 409, so live
ids could be scanned; one client opened 20,000 sessions. Here a session belongs to the
key that opened it (another key's continue starts its own, its cancel and end are the
404 of an unknown id, its 409 probe finds nothing), ``POST /v1/sessions`` makes ids
nobody chose, and one client's sessions and their tokens are bounded (429).

Two servers: one with three keys and the default limits, one without keys with small
limits (a client there is its address).
"""

from __future__ import annotations

import httpx
import pytest

from conftest import LiveServer

ROUTE = "/v1/chat/interactive"
SECRET = "The secret word is PINEAPPLE."
MAX_SESSIONS = 3
MAX_TOKENS = 150


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--api-keys", "k1", "k2", "k3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(tiny_model_dir):
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--max-sessions-per-client", str(MAX_SESSIONS),
                        "--max-session-tokens-per-client", str(MAX_TOKENS))
    yield server
    server.stop()


def client(server, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return server.client(headers=headers)


def turn(http: httpx.Client, session_id: int, prompt: str = "What is the secret word?", status: int = 200,
         **fields) -> dict:
    body = {"prompt": prompt, "session_id": session_id, "interactive_mode": True, "temperature": 0,
            "request_output_len": 4, **fields}
    response = http.post(ROUTE, json=body)
    assert response.status_code == status, response.text
    return response.json()


def end(http: httpx.Client, session_id: int) -> httpx.Response:
    return http.post(ROUTE, json={"prompt": "", "session_id": session_id, "request_output_len": 0,
                                  "interactive_mode": False})


def cancel(http: httpx.Client, session_id: int) -> httpx.Response:
    return http.post(ROUTE, json={"prompt": "", "session_id": session_id, "interactive_mode": True, "cancel": True})


def chat_with_session(http: httpx.Client, session_id: int) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "tiny", "session_id": session_id, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "hi"}]})


def new_session(http: httpx.Client) -> int:
    response = http.post("/v1/sessions")
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


# ------------------------------------------------------------------------ owners


@pytest.fixture(scope="module")
def secret_session(keyed):
    """k1's session 31337, told the secret (and one reply to it)."""
    with client(keyed, "k1") as k1:
        turn(k1, 31337, SECRET, request_output_len=0)  # primed: the secret is in the history
        turn(k1, 31337, "Remember it.")
    yield 31337
    with client(keyed, "k1") as k1:
        end(k1, 31337)


def k1_history(keyed, session_id: int) -> tuple[int, int]:
    """k1's history before and after a priming probe (which adds only its own input)."""
    with client(keyed, "k1") as k1:
        reply = turn(k1, session_id, "?", request_output_len=0)
    return reply["history_tokens"], reply["history_tokens"] + reply["input_tokens"]


def test_another_keys_turn_on_the_same_id_starts_its_own_session_and_sees_nothing(keyed, secret_session):
    _, history = k1_history(keyed, secret_session)
    with client(keyed, "k2") as k2:
        reply = turn(k2, secret_session)
        again = turn(k2, secret_session, "Tell me the secret word.")
        fresh = turn(k2, -1)  # the same question, with no history anywhere
        end(k2, secret_session)
    assert reply["history_tokens"] == 0, "k2 continued k1's conversation"
    assert reply["input_tokens"] == fresh["input_tokens"]
    assert reply["text"] == fresh["text"], "k2's reply was computed over more than its own question"
    assert again["history_tokens"] == reply["input_tokens"] + reply["tokens"], "k2's session is its own"
    assert k1_history(keyed, secret_session)[0] == history, "k1's conversation was disturbed"


def test_another_keys_cancel_and_end_are_the_404_of_an_unknown_session(keyed, secret_session):
    _, history = k1_history(keyed, secret_session)
    with client(keyed, "k2") as k2:
        answers = [cancel(k2, secret_session), end(k2, secret_session)]
        unknown = [cancel(k2, 424242), end(k2, 424242)]
    for answer, reference in zip(answers, unknown):
        assert answer.status_code == reference.status_code == 404
        assert answer.json()["error"]["param"] == "session_id"
        assert answer.text.replace(str(secret_session), "ID") == reference.text.replace("424242", "ID")
    assert answers[0].json()["message"] == f"No session {secret_session}."
    assert k1_history(keyed, secret_session)[0] == history, "k2's cancel or end touched k1's session"


def test_the_409_probe_finds_only_the_callers_own_sessions(keyed, secret_session):
    session_id = secret_session
    with client(keyed, "k2") as k2:
        assert chat_with_session(k2, session_id).status_code == 200
    with client(keyed, "k1") as k1:
        refused = chat_with_session(k1, session_id)
    assert refused.status_code == 409 and refused.json()["error"]["param"] == "session_id"


def test_the_owner_still_cancels_and_ends_its_session(keyed):
    with client(keyed, "k1") as k1:
        turn(k1, 5150, "hello")
        assert cancel(k1, 5150).status_code == 200
        assert end(k1, 5150).status_code == 200
        assert end(k1, 5150).status_code == 404, "ended: now unknown"


# --------------------------------------------------------------- server-made ids


def test_server_made_ids_are_large_distinct_and_their_owners_only(keyed):
    with client(keyed, "k1") as k1, client(keyed, "k2") as k2:
        ids = [new_session(k1) for _ in range(5)]
        assert len(set(ids)) == 5 and all(2**20 < i < 2**53 for i in ids)
        first = ids[0]
        assert chat_with_session(k1, first).status_code == 409, "reserved: live for its owner"
        assert chat_with_session(k2, first).status_code == 200
        assert end(k2, first).status_code == 404
        assert turn(k1, first, "hello")["history_tokens"] == 0
        assert turn(k1, first, "again")["history_tokens"] > 0
        for session_id in ids:
            assert end(k1, session_id).status_code == 200
        assert end(k1, first).status_code == 404


def test_a_server_made_id_needs_a_key(keyed):
    with client(keyed) as nobody:
        assert nobody.post("/v1/sessions").status_code == 401


def test_the_openapi_document_describes_the_sessions_route(keyed):
    document = httpx.get(keyed.base_url + "/openapi.json").json()
    operation = document["paths"]["/v1/sessions"]["post"]
    assert {"200", "401", "429"} <= set(operation["responses"])
    assert "404" in document["paths"][ROUTE]["post"]["responses"]


# -------------------------------------------------------------------- the limits


def test_a_thousand_sessions_from_one_key_stop_at_its_limit(keyed):
    with client(keyed, "k3") as k3, client(keyed, "k1") as k1:
        answers = [k3.post("/v1/sessions") for _ in range(1000)]
        statuses = [answer.status_code for answer in answers]
        assert statuses.count(200) == 256 and statuses.count(429) == 744
        assert statuses[:256] == [200] * 256
        refusal = answers[-1].json()
        assert refusal["error"]["param"] == "session_id" and "--max-sessions-per-client" in refusal["message"]
        assert turn(k3, 777, "hello", status=429)["error"]["type"] == "rate_limit_error"
        assert new_session(k1), "the limit is per key"
        held = [answer.json()["session_id"] for answer in answers[:256]]
        assert end(k3, held[0]).status_code == 200
        assert turn(k3, 777, "hello")["history_tokens"] == 0, "an ended session's slot is free again"
        assert k3.post("/v1/sessions").status_code == 429
        for session_id in [*held[1:], 777]:
            assert end(k3, session_id).status_code == 200
        assert k3.post("/v1/sessions").status_code == 200


def test_sessions_past_the_limit_are_refused_one_shot_and_ending_turns_are_not(limited):
    with client(limited) as http:
        for session_id in range(1, MAX_SESSIONS + 1):
            turn(http, session_id, "hi", request_output_len=0)
        refused = turn(http, MAX_SESSIONS + 1, "hi", status=429)
        assert refused["error"]["param"] == "session_id" and str(MAX_SESSIONS) in refused["message"]
        assert http.post("/v1/sessions").status_code == 429
        assert turn(http, -1, "hi")["finish_reason"] is not None, "a one-shot request opens no session"
        assert turn(http, 99, "hi", interactive_mode=False)["history_tokens"] == 0, "ended after its turn"
        turn(http, 1, "more", request_output_len=0)  # a live session goes on
        assert end(http, 2).status_code == 200
        turn(http, MAX_SESSIONS + 1, "hi", request_output_len=0)
        for session_id in (1, 3, MAX_SESSIONS + 1):
            end(http, session_id)


def test_the_token_limit_refuses_history_past_it_and_cuts_a_reply_at_it(limited):
    with client(limited) as http:
        def input_tokens(text: str) -> int:  # a first turn's, measured by a one-shot that keeps nothing
            return turn(http, -1, text, request_output_len=0)["input_tokens"]

        small, large = "hello", "how are you today? " * 8
        assert input_tokens(small) + input_tokens(large) > MAX_TOKENS >= input_tokens(large)
        turn(http, 1, small, request_output_len=0)
        refused = turn(http, 2, large, status=429, request_output_len=0)
        assert refused["error"]["param"] == "session_id"
        assert "--max-session-tokens-per-client" in refused["message"] and str(MAX_TOKENS) in refused["message"]
        assert end(http, 1).status_code == 200  # its tokens free the room
        assert turn(http, 2, large, request_output_len=0)["history_tokens"] == 0
        assert end(http, 2).status_code == 200

        cut = turn(http, 3, small, request_output_len=200, ignore_eos=True)
        assert cut["finish_reason"] == "length"
        assert cut["tokens"] == MAX_TOKENS - cut["input_tokens"], "the reply stops at the limit"
        assert end(http, 3).status_code == 200
