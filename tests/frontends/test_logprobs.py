"""Log-probabilities on a live tiny server: chat's ``logprobs``/``top_logprobs``
and completions' ``logprobs`` columns, streamed and not."""

import math

from conftest import post, stream
from tiny_api import MESSAGES, PROMPT, chat, complete, pick_stop
from tiny_api import greedy  # noqa: F401  (a fixture: tests name it as an argument)


def test_chat_logprobs_with_top_alternatives(tiny_server):
    reply = chat(tiny_server, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 8
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [alt["logprob"] for alt in top] == sorted((alt["logprob"] for alt in top), reverse=True)
        assert top[0]["bytes"] == entry["bytes"] and top[0]["token"] == entry["token"]  # greedy: the top-1
        assert top[0]["logprob"] == entry["logprob"]
        assert all(alt["logprob"] <= 0 for alt in top) and entry["logprob"] <= 0
        assert sum(math.exp(alt["logprob"]) for alt in top) <= 1 + 1e-6
        try:  # a token that is part of a character is named by its bytes, as OpenAI does
            assert entry["token"] == bytes(entry["bytes"]).decode("utf-8")
        except UnicodeDecodeError:
            assert entry["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in entry["bytes"])
    all_bytes = bytes(b for entry in content for b in entry["bytes"])
    assert all_bytes.decode("utf-8", errors="replace") == choice["message"]["content"]


def test_chat_logprobs_without_top_logprobs(tiny_server):
    content = chat(tiny_server, max_tokens=4, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)
    content = chat(tiny_server, max_tokens=4, logprobs=True, top_logprobs=0)["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)
    assert chat(tiny_server, max_tokens=4)["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed_equal_non_streamed(tiny_server):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    whole = post(tiny_server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    streamed = [entry for payload in stream(tiny_server, "/v1/chat/completions", body)
                for choice in payload["choices"] if choice["logprobs"]
                for entry in choice["logprobs"]["content"]]
    assert streamed == whole


def test_completion_logprobs_columns(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)
    choice = reply["choices"][0]
    assert choice["text"] == text
    logprobs = choice["logprobs"]
    columns = [logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")]
    assert {len(column) for column in columns} == {40}
    assert all(value <= 0 for value in logprobs["token_logprobs"])
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, offset, top in zip(logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 2 and all(value <= 0 for value in top.values())
        if not token.startswith("bytes:"):  # a whole token: its text is at its offset
            assert text[offset:offset + len(token)] == token


def test_completion_logprobs_greedy_token_is_the_top_alternative(tiny_server):
    """In ASCII stretches (distinct token texts) the greedy token is the best alternative."""
    logprobs = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)["choices"][0]["logprobs"]
    checked = 0
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        if token.startswith("bytes:") or len(top) < 2:
            continue
        assert top[token] == logprob == max(top.values())
        checked += 1
    assert checked >= 5


def test_completion_top_logprobs_keep_the_sampled_tokens_logprob(tiny_server):
    logprobs = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)["choices"][0]["logprobs"]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 2
        assert top.get(token) == logprob  # greedy: the sampled token is the top-1


def test_completion_text_offsets_stay_inside_the_text(tiny_server):
    # "hello world" makes the tiny model write a two-byte character out of two byte tokens.
    reply = complete(tiny_server, "hello world", max_tokens=40, ignore_eos=True, logprobs=0)
    text, logprobs = reply["choices"][0]["text"], reply["choices"][0]["logprobs"]
    assert any(t.startswith("bytes:") for t in logprobs["tokens"])  # the premise: parts of characters
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and all(offset < len(text) for offset in offsets)
    for token, offset in zip(logprobs["tokens"], offsets):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token


def test_completion_logprobs_streamed_equal_non_streamed(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "ignore_eos": True, "logprobs": 1}
    whole = post(tiny_server, "/v1/completions", body)["choices"][0]["logprobs"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    payloads = stream(tiny_server, "/v1/completions", body)
    assert payloads[-1]["choices"][0]["logprobs"] is None  # the finish chunk carries none (LMDeploy)
    for payload in payloads[:-1]:
        for key in merged:
            merged[key] += payload["choices"][0]["logprobs"][key]
    assert merged == whole


def test_logprobs_of_a_stopped_generation_cover_every_counted_token(tiny_server, greedy):
    text, tokens, starts = greedy
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 40, "ignore_eos": True,
            "logprobs": 0, "stop": pick_stop(text, starts)}
    whole = post(tiny_server, "/v1/completions", body)
    counted = whole["usage"]["completion_tokens"]
    assert whole["choices"][0]["logprobs"]["tokens"] == tokens[:counted]
    streamed = [token for payload in stream(tiny_server, "/v1/completions", body)
                if payload["choices"][0]["finish_reason"] is None
                for token in payload["choices"][0]["logprobs"]["tokens"]]
    assert streamed == tokens[:counted]
