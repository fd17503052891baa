"""``POST /v1/chat/interactive`` on live tiny servers: the endpoint's contract.

History accounting over several turns, the JSON lines stream, the busy rule
(409) and cancel, ending a session (and freeing its KV cache), one-shot
requests, a full session, priming, the other APIs refusing a live session's
id, the idle TTL, the 400s, and the seed's curl example.

Two servers: one on the long-context tiny model (a turn there can run long
enough to be interrupted), one with a 64-token session and a 0.5 s TTL. Each
test uses session ids of its own and ends the sessions it leaves live, so the
first server's KV cache is empty between tests.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import httpx
import pytest

from conftest import LiveServer, post

ROUTE = "/v1/chat/interactive"
FIELDS = {"text", "tokens", "input_tokens", "history_tokens", "finish_reason"}
#: The reply to an end or a cancel: nothing generated, nothing counted.
ZERO_REPLY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}
SESSION_LEN = 64
TTL_S = 0.5
#: Minutes of decoding on the tiny model: a turn that runs until it is stopped.
LONG_OUTPUT_LEN = 30000


@pytest.fixture(scope="module")
def chatml_model_dir(long_model_dir, tmp_path_factory):
    """The long-context tiny model (a turn with ``ignore_eos`` can run for
    minutes) whose only EOS is ChatML's end-of-turn mark: its generation config
    also names byte 2, and a reply stopped by that one leaves no end-of-turn
    mark in the history."""
    directory = tmp_path_factory.mktemp("tiny-chatml")
    for file in long_model_dir.iterdir():
        shutil.copy(file, directory)
    eos = json.loads((directory / "config.json").read_text())["eos_token_id"]
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    generation["eos_token_id"] = eos
    generation_path.write_text(json.dumps(generation))
    return directory


@pytest.fixture(scope="module")
def server(chatml_model_dir):
    server = LiveServer(chatml_model_dir, "--model-name", "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_server(tiny_model_dir):
    """A 64-token session and idle sessions ended after half a second."""
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--session-len", str(SESSION_LEN),
                        "--session-ttl", str(TTL_S))
    yield server
    server.stop()


# --------------------------------------------------------------------------- helpers


def turn(server, session_id: int, prompt="hello there", **fields) -> dict:
    """One non-streaming turn that keeps the session (greedy unless told)."""
    body = {"prompt": prompt, "session_id": session_id, "interactive_mode": True, "temperature": 0, **fields}
    reply = post(server, ROUTE, body)
    assert set(reply) == FIELDS, reply
    return reply


def send(server, body: dict) -> httpx.Response:
    """POST ``body`` to the endpoint, whatever the answer."""
    return httpx.post(server.base_url + ROUTE, json=body, timeout=30)


def end(server, session_id: int) -> dict:
    return post(server, ROUTE, {"prompt": "", "session_id": session_id, "request_output_len": 0,
                                "interactive_mode": False})


def stream_turn(server, session_id: int, prompt: str, **fields) -> list[dict]:
    """A streaming turn's lines, each checked to be a bare JSON object."""
    body = {"prompt": prompt, "session_id": session_id, "interactive_mode": True, "temperature": 0,
            "stream": True, **fields}
    with httpx.stream("POST", server.base_url + ROUTE, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/x-ndjson; charset=utf-8"
        raw = [line for line in response.iter_lines() if line.strip()]
    assert raw, "an empty stream"
    for line in raw:
        assert not line.startswith("data:") and line != "[DONE]", line
    lines = [json.loads(line) for line in raw]
    for line in lines:
        assert set(line) == FIELDS, line
    return lines


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    """``response`` is an error in OpenAI's shape (with LMDeploy's top-level copies)."""
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == status
    assert error["param"] == param, error
    assert body["code"] == status and body["message"] == error["message"]
    return error


def kv_cache_usage(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    match = re.search(r"^lmserve:kv_cache_usage_perc(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def wait_for_usage(server, expected: float, timeout: float = 5) -> float:
    """The KV cache usage once it equals ``expected``, or whatever it is after
    ``timeout``: the engine frees a session's memory a moment after the reply."""
    deadline = time.monotonic() + timeout
    while (usage := kv_cache_usage(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return usage


def idle_usage(server) -> float:
    """The KV cache usage of the idle server: 0 (every test ends its sessions)."""
    usage = wait_for_usage(server, 0.0)
    assert usage == 0.0, "an idle server keeps no memory"
    return usage


# ------------------------------------------------------------------------ multi-round


def test_history_tokens_add_up_over_four_turns(server):
    history = 0
    for round_, prompt in enumerate(["hello there", "how are you?", "tell me more", "bye now"]):
        output_len = 5 + round_
        reply = turn(server, 11, prompt, request_output_len=output_len, ignore_eos=True)
        assert reply["history_tokens"] == history, (round_, reply)
        assert reply["tokens"] == output_len, reply
        assert reply["finish_reason"] == "length"
        assert reply["input_tokens"] > 0
        assert reply["text"]
        history += reply["input_tokens"] + reply["tokens"]
    assert end(server, 11) == ZERO_REPLY


def test_a_reply_ended_by_its_stop_token_counts_it_and_the_next_turn_does_not_repeat_it(server):
    """The stop token (ChatML's end-of-turn mark, the model's EOS) is one of the
    reply's tokens and stays in the history, so the next turn's text starts
    after it: one token shorter than after a reply cut by length, which the
    template's end-of-turn mark has to close."""
    stopped = None
    for seed in range(64):  # sampling: some seed soon ends a reply on EOS
        reply = turn(server, 13, "hi", temperature=1.0, seed=seed, request_output_len=40)
        if reply["finish_reason"] == "stop":
            stopped = reply
            break
        end(server, 13)
    assert stopped is not None, "no seed ended a reply on its stop token"
    assert stopped["tokens"] >= 1
    after_stop = turn(server, 13, "next question", request_output_len=2, ignore_eos=True)
    assert after_stop["history_tokens"] == stopped["input_tokens"] + stopped["tokens"]
    cut = turn(server, 14, "hi", request_output_len=3, ignore_eos=True)
    assert cut["input_tokens"] == stopped["input_tokens"] and cut["finish_reason"] == "length"
    after_cut = turn(server, 14, "next question", request_output_len=2, ignore_eos=True)
    assert after_stop["input_tokens"] == after_cut["input_tokens"] - 1
    end(server, 13)
    end(server, 14)


# ------------------------------------------------------------------------- streaming


def test_stream_is_json_lines_and_matches_the_same_conversation_unstreamed(server):
    for prompt, output_len in [("hello there", 12), ("and after that?", 9)]:
        lines = stream_turn(server, 21, prompt, request_output_len=output_len, ignore_eos=True)
        whole = turn(server, 22, prompt, request_output_len=output_len, ignore_eos=True)
        assert [line["finish_reason"] for line in lines[:-1]] == [None] * (len(lines) - 1)
        assert lines[-1]["finish_reason"] == "length"
        counts = [line["tokens"] for line in lines]
        assert counts == sorted(set(counts)), f"tokens must count up: {counts}"
        assert counts[-1] == output_len
        assert {(line["input_tokens"], line["history_tokens"]) for line in lines} == {
            (whole["input_tokens"], whole["history_tokens"])}
        assert "".join(line["text"] for line in lines) == whole["text"]
        assert whole["tokens"] == output_len and whole["finish_reason"] == "length"
    end(server, 21)
    end(server, 22)


# ---------------------------------------------------------------------- busy, cancel


class LongTurn:
    """A streaming turn that would run for minutes, read in a thread; the lines
    read so far are in ``lines``."""

    def __init__(self, server, session_id: int):
        self.lines: list[dict] = []
        self.status: list[int] = []
        self._some_arrived = threading.Event()
        body = {"prompt": "talk for a long time", "session_id": session_id, "interactive_mode": True,
                "stream": True, "request_output_len": LONG_OUTPUT_LEN, "ignore_eos": True}
        self._thread = threading.Thread(target=self._read, args=(server, body), daemon=True)
        self._thread.start()
        assert self._some_arrived.wait(30), "no lines streamed"
        assert self.status == [200] and len(self.lines) >= 3, (self.status, self.lines)

    def _read(self, server, body: dict) -> None:
        try:
            with httpx.stream("POST", server.base_url + ROUTE, json=body, timeout=60) as response:
                self.status.append(response.status_code)
                for line in response.iter_lines():
                    if line.strip():
                        self.lines.append(json.loads(line))
                        if len(self.lines) >= 3:
                            self._some_arrived.set()
        finally:
            self._some_arrived.set()

    def join(self) -> list[dict]:
        """The lines, once the stream ended (checked to end within 30 s)."""
        self._thread.join(30)
        assert not self._thread.is_alive(), "the stream went on"
        return self.lines


def test_a_busy_session_refuses_a_second_turn_and_cancel_keeps_what_was_streamed(server):
    long_turn = LongTurn(server, 31)
    try:
        busy = send(server, {"prompt": "meanwhile", "session_id": 31, "interactive_mode": True})
        assert_error(busy, 409, "session_id")
    finally:  # the turn stops whatever happened
        cancelled = send(server, {"prompt": "", "session_id": 31, "interactive_mode": True, "cancel": True})
    assert cancelled.status_code == 200 and cancelled.json() == ZERO_REPLY, cancelled.text
    lines = long_turn.join()
    assert lines[-1]["finish_reason"] == "abort", lines[-1]
    assert all(line["finish_reason"] is None for line in lines[:-1])
    streamed = lines[-1]["tokens"]
    assert 3 <= streamed < LONG_OUTPUT_LEN
    assert streamed == max(line["tokens"] for line in lines)
    after = turn(server, 31, "go on", request_output_len=2, ignore_eos=True)
    assert after["history_tokens"] == lines[0]["input_tokens"] + streamed
    assert after["tokens"] == 2
    end(server, 31)


def test_ending_a_busy_session_stops_its_turn_and_forgets_it(server):
    baseline = idle_usage(server)
    long_turn = LongTurn(server, 33)
    assert end(server, 33) == ZERO_REPLY
    lines = long_turn.join()
    assert lines[-1]["finish_reason"] == "abort", lines[-1]
    assert lines[-1]["tokens"] < LONG_OUTPUT_LEN
    assert wait_for_usage(server, baseline) == baseline
    assert turn(server, 33, request_output_len=2, ignore_eos=True)["history_tokens"] == 0
    end(server, 33)


def test_cancel_of_an_idle_session_is_harmless(server):
    first = turn(server, 32, request_output_len=3, ignore_eos=True)
    reply = post(server, ROUTE, {"prompt": "", "session_id": 32, "interactive_mode": True, "cancel": True})
    assert reply == ZERO_REPLY
    second = turn(server, 32, "again", request_output_len=3, ignore_eos=True)
    assert second["history_tokens"] == first["input_tokens"] + 3
    end(server, 32)


# ---------------------------------------------------------------------------- ending


def test_end_answers_zero_frees_the_kv_cache_and_starts_over(server):
    baseline = idle_usage(server)
    first = turn(server, 41, request_output_len=4, ignore_eos=True)
    assert kv_cache_usage(server) > baseline, "the session's KV cache is kept between turns"
    assert end(server, 41) == ZERO_REPLY
    assert wait_for_usage(server, baseline) == baseline
    again = turn(server, 41, request_output_len=4, ignore_eos=True)
    assert again["history_tokens"] == 0
    assert again["input_tokens"] == first["input_tokens"], "the first turn of a new conversation"
    end(server, 41)
    assert wait_for_usage(server, baseline) == baseline


def test_a_turn_without_interactive_mode_ends_the_session_after_it(server):
    baseline = idle_usage(server)
    first = turn(server, 42, request_output_len=3, ignore_eos=True)
    last = turn(server, 42, "last words", request_output_len=3, ignore_eos=True, interactive_mode=False)
    assert last["history_tokens"] == first["input_tokens"] + 3, "the turn still sees the history"
    assert last["tokens"] == 3
    assert wait_for_usage(server, baseline) == baseline
    assert turn(server, 42, request_output_len=3, ignore_eos=True)["history_tokens"] == 0
    end(server, 42)


def test_ending_an_unknown_session_answers_zero(server):
    assert end(server, 43) == ZERO_REPLY


# -------------------------------------------------------------------------- one-shot


def test_one_shot_requests_keep_nothing(server):
    baseline = idle_usage(server)
    for _ in range(2):
        reply = turn(server, -1, request_output_len=3, ignore_eos=True)
        assert reply["history_tokens"] == 0
        assert reply["tokens"] == 3 and reply["input_tokens"] > 0
    assert wait_for_usage(server, baseline) == baseline


# ---------------------------------------------------------------------- session full


def test_a_turn_past_the_session_length_stops_at_it_then_nothing_fits(small_server):
    first = turn(small_server, 51, request_output_len=4, ignore_eos=True)
    assert first["tokens"] == 4 and first["finish_reason"] == "length"
    history = first["input_tokens"] + 4
    filling = turn(small_server, 51, "more please", request_output_len=1000, ignore_eos=True)
    assert filling["history_tokens"] == history
    assert filling["finish_reason"] == "length"
    assert 0 < filling["tokens"] < 1000
    assert history + filling["input_tokens"] + filling["tokens"] == SESSION_LEN
    full = turn(small_server, 51, "and?", request_output_len=5, ignore_eos=True)
    assert full["history_tokens"] == SESSION_LEN
    assert full["tokens"] == 0 and full["text"] == "" and full["finish_reason"] == "length"
    end(small_server, 51)


# --------------------------------------------------------------------------- priming


def test_priming_adds_the_input_to_the_history_without_generating(server):
    prime = turn(server, 71, "You answer in one word.", request_output_len=0)
    assert prime["tokens"] == 0 and prime["text"] == ""
    assert prime["history_tokens"] == 0 and prime["input_tokens"] > 0
    reply = turn(server, 71, "hi", request_output_len=3, ignore_eos=True)
    assert reply["history_tokens"] == prime["input_tokens"]
    assert reply["tokens"] == 3
    history = reply["history_tokens"] + reply["input_tokens"] + 3
    again = turn(server, 71, "Remember this.", request_output_len=0)  # in the middle of a conversation
    assert again["history_tokens"] == history and again["tokens"] == 0 and again["input_tokens"] > 0
    last = turn(server, 71, "and now?", request_output_len=3, ignore_eos=True)
    assert last["history_tokens"] == history + again["input_tokens"]
    end(server, 71)


# --------------------------------------------------------------- the other APIs


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_other_apis_refuse_a_live_sessions_id_until_it_ends(server, path, body):
    request = {"model": "tiny", **body, "max_tokens": 2, "session_id": 61}
    post(server, path, request)  # no such session yet
    turn(server, 61, request_output_len=2, ignore_eos=True)
    refused = httpx.post(server.base_url + path, json=request, timeout=30)
    assert_error(refused, 409, "session_id")  # a conflict with the server's state, not a bad body
    end(server, 61)
    post(server, path, request)


# ------------------------------------------------------------------------------- TTL


def test_an_idle_session_is_ended_after_the_ttl(small_server):
    first = turn(small_server, 81, request_output_len=2, ignore_eos=True)
    second = turn(small_server, 81, "next", request_output_len=2, ignore_eos=True)
    assert second["history_tokens"] == first["input_tokens"] + 2, "not ended while in use"
    time.sleep(3 * TTL_S)
    assert turn(small_server, 81, request_output_len=2, ignore_eos=True)["history_tokens"] == 0
    end(small_server, 81)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param", [
    ({"prompt": "", "session_id": -1, "cancel": True}, "session_id"),
    ({"prompt": "hi", "image_url": "https://example.com/cat.png"}, "image_url"),
    ({"prompt": "hi", "adapter_name": "lora"}, "adapter_name"),
    ({"prompt": "hi", "request_output_len": -1}, "request_output_len"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"session_id": 5, "interactive_mode": True}, "prompt"),
    ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
], ids=["cancel-one-shot", "image_url", "adapter_name", "negative-output-len", "temperature-string",
        "no-prompt", "too-many-stops", "empty-stop"])
def test_bad_requests_get_400_in_openai_shape(server, body, param):
    assert_error(send(server, body), 400, param)


def test_a_non_json_body_gets_400(server):
    response = httpx.post(server.base_url + ROUTE, content=b"{not json",
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(response, 400, None)


def test_a_refused_turn_leaves_the_history_alone(server):
    first = turn(server, 91, request_output_len=3, ignore_eos=True)
    body = {"prompt": "x", "session_id": 91, "interactive_mode": True}
    assert_error(send(server, {**body, "request_output_len": -1}), 400, "request_output_len")
    assert_error(send(server, {**body, "image_url": "https://example.com/cat.png"}), 400, "image_url")
    assert_error(send(server, {**body, "stop": ["s"] * 17}), 400, "stop")
    assert_error(send(server, {**body, "stop": [""]}), 400, "stop")  # refused once the turn began
    again = turn(server, 91, "still here?", request_output_len=3, ignore_eos=True)
    assert again["history_tokens"] == first["input_tokens"] + 3
    end(server, 91)


# ----------------------------------------------------------------- the seed's example


def test_the_seeds_curl_example(small_server):
    reply = post(small_server, ROUTE, {"prompt": "Hello! How are you?", "session_id": 1, "interactive_mode": True})
    assert set(reply) == FIELDS
    assert isinstance(reply["text"], str)
    assert reply["history_tokens"] == 0 and reply["input_tokens"] > 0
    assert 0 < reply["tokens"] <= SESSION_LEN - reply["input_tokens"]
    assert reply["finish_reason"] in ("stop", "length")
    end(small_server, 1)
