"""Interactive sessions on the real model: what a multi-turn chat must get right.

The server keeps each conversation's KV cache between turns; these tests check
that doing so changes no token (against the same conversation sent whole to
/v1/chat/completions, and after the kept cache was evicted), and that history
accounting, cancel, end and the busy rule hold.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from conftest import LiveServer, post

pytestmark = pytest.mark.real_model

QUESTIONS = ["hi, what's your name?", "who developed you?", "Tell me more about your developers"]
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "request_output_len": 120}
#: Blocks of 64 tokens: a cache small enough for one long one-shot request to evict kept sessions.
CACHE_BLOCKS = 24
SESSION_LEN = CACHE_BLOCKS * 64


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    server = LiveServer(smollm2_gguf, "--session-len", str(SESSION_LEN),
                        "--cache-max-entry-count", str(CACHE_BLOCKS), "--model-name", "smollm2")
    yield server
    server.stop()


def turn(server, session_id: int, prompt, **fields) -> dict:
    return post(server, "/v1/chat/interactive",
                {"prompt": prompt, "session_id": session_id, "interactive_mode": True, **GREEDY, **fields},
                timeout=300)


def end(server, session_id: int) -> None:
    post(server, "/v1/chat/interactive", {"prompt": "", "session_id": session_id, "request_output_len": 0,
                                          "interactive_mode": False})


def metric(server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    return float(re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def test_history_tokens_are_exact_and_turn_three_equals_the_whole_conversation(server):
    replies, history = [], 0
    for question in QUESTIONS:
        reply = turn(server, 101, question)
        assert reply["history_tokens"] == history, "the sum of earlier turns' input and output tokens"
        assert reply["tokens"] > 0 and reply["finish_reason"] in ("stop", "length"), reply
        history += reply["input_tokens"] + reply["tokens"]
        replies.append(reply["text"])
    messages = []
    for question, answer in zip(QUESTIONS[:2], replies[:2]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": QUESTIONS[2]})
    whole = post(server, "/v1/chat/completions", {"model": "smollm2", "messages": messages, "temperature": 0.0,
                                                  "max_tokens": 120}, timeout=300)
    assert whole["choices"][0]["message"]["content"] == replies[2]
    # The history is exactly the whole conversation's prompt plus the last reply.
    assert history == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
    end(server, 101)


def test_end_frees_the_sessions_blocks(server):
    baseline = metric(server, "lmserve:kv_cache_usage_perc")
    turn(server, 102, QUESTIONS[0])
    assert metric(server, "lmserve:kv_cache_usage_perc") > baseline, "the session's KV cache is kept"
    assert metric(server, "lmserve:num_sessions_with_kept_kv") == 1
    end(server, 102)
    assert metric(server, "lmserve:kv_cache_usage_perc") == baseline
    assert metric(server, "lmserve:num_interactive_sessions") == 0
    assert turn(server, 102, QUESTIONS[0])["history_tokens"] == 0, "a new conversation"
    end(server, 102)


def test_a_busy_session_gets_409_and_cancel_keeps_what_was_generated(server):
    long_turn = {"prompt": "Count from one to one thousand.", "session_id": 103, "interactive_mode": True,
                 "stream": True, "ignore_eos": True, **GREEDY, "request_output_len": 1000}
    lines: list[dict] = []
    with httpx.stream("POST", server.base_url + "/v1/chat/interactive", json=long_turn, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for raw in response.iter_lines():
            if not raw:
                continue
            lines.append(json.loads(raw))  # plain JSON lines: no "data: " prefix
            if len(lines) == 5:
                busy = httpx.post(server.base_url + "/v1/chat/interactive",
                                  json={"prompt": "hello?", "session_id": 103, "interactive_mode": True})
                assert busy.status_code == 409, busy.text
                assert busy.json()["error"]["param"] == "session_id"
                threading.Thread(target=post, args=(server, "/v1/chat/interactive",
                                                    {"prompt": "", "session_id": 103, "cancel": True})).start()
    assert lines[-1]["finish_reason"] == "abort" and len(lines) < 1000
    generated = lines[-1]["tokens"]
    reply = turn(server, 103, "What was I asking?", request_output_len=8)
    assert reply["history_tokens"] == lines[0]["input_tokens"] + generated, "the cancelled turn stays in history"
    end(server, 103)


def test_an_evicted_session_continues_with_the_same_tokens(server):
    # The same two-turn conversation on two sessions; between the turns of the
    # second, a long one-shot request needs the whole cache and evicts it.
    first = [turn(server, 104, q, ignore_eos=True, request_output_len=40) for q in QUESTIONS[:2]]
    turn(server, 105, QUESTIONS[0], ignore_eos=True, request_output_len=40)
    assert metric(server, "lmserve:num_sessions_with_kept_kv") == 2
    preemptions = metric(server, "lmserve:num_preemptions_total")
    long_prompt = "Tell me a story. " * 290  # about 1480 tokens: 24 blocks, the whole cache
    one_shot = post(server, "/v1/chat/interactive", {"prompt": long_prompt, "session_id": -1, **GREEDY,
                                                     "request_output_len": 8}, timeout=300)
    assert one_shot["tokens"] == 8
    assert metric(server, "lmserve:num_sessions_with_kept_kv") == 0, "both kept sessions were evicted"
    assert metric(server, "lmserve:num_preemptions_total") == preemptions, "eviction, not preemption"
    second = turn(server, 105, QUESTIONS[1], ignore_eos=True, request_output_len=40)
    assert second["history_tokens"] == first[1]["history_tokens"]
    assert second["text"] == first[1]["text"], "recomputing the evicted history changes nothing"
    end(server, 104)
    end(server, 105)
