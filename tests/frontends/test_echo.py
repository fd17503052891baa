"""Completions' ``echo`` on a live tiny server: the prompt before each choice's
text, with its logprobs when asked for."""

from conftest import post, stream
from tiny_api import PROMPT, complete, pick_stop, streamed_texts
from tiny_api import greedy  # noqa: F401  (a fixture: tests name it as an argument)


def test_echo_prepends_the_prompt(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True)
    assert reply["choices"][0]["text"] == PROMPT + text
    assert reply["usage"]["completion_tokens"] == 40


def test_echo_streamed_and_with_n_and_token_ids(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": "abc"})["tokens"]
    plain = complete(tiny_server, "abc", max_tokens=5, ignore_eos=True)["choices"][0]["text"]
    body = {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 5, "ignore_eos": True,
            "echo": True, "n": 2}
    whole = post(tiny_server, "/v1/completions", body)
    assert [c["text"] for c in whole["choices"]] == ["abc" + plain] * 2
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {0: "abc" + plain,
                                                                                       1: "abc" + plain}


def test_echo_with_a_stop_string_keeps_the_prompt(tiny_server, greedy):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True, stop=stop)
    assert reply["choices"][0]["text"] == PROMPT + text[: text.find(stop)]


def test_a_stop_string_in_the_echoed_prompt_does_not_cut(tiny_server, greedy):
    text, _, _ = greedy
    assert "quick" not in text
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True, stop="quick")
    assert reply["choices"][0]["text"] == PROMPT + text
    assert reply["choices"][0]["finish_reason"] == "length"


def test_echo_with_logprobs_scores_the_prompt_too(tiny_server):
    """lm-eval's loglikelihood: echo + logprobs gives every prompt token's logprob (the first: None)."""
    prompt_ids = post(tiny_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 3, "ignore_eos": True,
            "logprobs": 1, "echo": True}
    whole = post(tiny_server, "/v1/completions", body)
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 3 == whole["usage"]["prompt_tokens"] + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(value <= 0 for value in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    assert choice["text"].startswith(PROMPT)
    # the completion's part equals what the same request without echo returns
    plain = post(tiny_server, "/v1/completions", {**body, "echo": False})["choices"][0]["logprobs"]
    assert logprobs["tokens"][len(prompt_ids):] == plain["tokens"]
    assert logprobs["token_logprobs"][len(prompt_ids):] == plain["token_logprobs"]
    # streamed: the echo chunk carries the prompt's columns; everything concatenates to the same
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for payload in stream(tiny_server, "/v1/completions", body):
        for streamed in payload["choices"]:
            text += streamed["text"]
            for key in merged:
                merged[key] += (streamed["logprobs"] or {}).get(key, [])
    assert text == choice["text"] and merged == logprobs
