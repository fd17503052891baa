"""The checks the load tests run on every response (loadtests/checks.py), on recorded good and bad responses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"


@pytest.fixture(scope="module")
def checks():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(LOADTESTS))
        import checks

        yield checks
    sys.modules.pop("checks", None)


def sse(*chunks) -> list[str]:
    return [f"data: {json.dumps(chunk)}" if isinstance(chunk, dict) else chunk for chunk in chunks]


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
HELLO = {"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}
WORLD = {"choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": None}]}
LAST = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}
GOOD = sse(ROLE, HELLO, WORLD, LAST, USAGE, "data: [DONE]")


def test_a_good_stream_passes_and_gives_its_text(checks):
    assert checks.check_chat_stream(GOOD, max_tokens=2) == ("Hello world", [])


@pytest.mark.parametrize("lines, problem", [
    (GOOD[:-1], "without [DONE]"),  # cut off
    (GOOD[:2] + GOOD[-1:], "0 finish reasons"),  # chunks lost
    (sse(ROLE, HELLO, LAST, LAST, USAGE, "data: [DONE]"), "2 finish reasons"),
    (GOOD[:-2] + GOOD[-1:], "no usage"),
    (GOOD[:3] + ['data: {"choices": [{"delta": {"content": "x"'] + GOOD[3:], "not JSON"),
    (GOOD[:2] + sse({"error": {"message": "The engine failed", "code": 500}}) + GOOD[-1:], "error event"),
    (GOOD + ["data: [DONE]"], "data after [DONE]"),
    (sse(HELLO, LAST, USAGE, "data: [DONE]"), "assistant role"),
    (GOOD[:4] + sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 12}})
     + GOOD[-1:], "total_tokens 12"),
    (GOOD, "finish_reason length after 2 of max_tokens 5"),
])
def test_a_broken_stream_fails(checks, lines, problem):
    max_tokens = 5 if "max_tokens 5" in problem else 2
    _, problems = checks.check_chat_stream(lines, max_tokens)
    assert any(problem in p for p in problems), problems


def test_chat_completion_usage_and_finish(checks):
    good = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    assert checks.check_chat(good, max_tokens=8) == []
    assert checks.check_chat({**good, "usage": {**good["usage"], "completion_tokens": 9, "total_tokens": 14}}, 8)
    assert checks.check_chat({**good, "choices": []}, 8) == ["0 choices"]
    bad_finish = {**good, "choices": [{**good["choices"][0], "finish_reason": "error"}]}
    assert checks.check_chat(bad_finish, 8) == ["finish_reason 'error'"]


def test_completions_for_a_prompt_list_with_echo_and_logprobs(checks):
    def choice(index, text, tokens):
        return {"index": index, "text": text, "finish_reason": "length", "logprobs": {"tokens": tokens}}

    body = {"choices": [choice(1, "B b", ["b"]), choice(0, "A a", ["a"])],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    assert checks.check_completions(body, 2, max_tokens=1, logprobs=True) == []
    assert checks.check_completions(body, 2, max_tokens=1, echo_prefixes=["A", "B"]) == []
    assert checks.check_completions(body, 2, max_tokens=1, echo_prefixes=["B", "A"]) == [
        "choice 0 does not echo its prompt", "choice 1 does not echo its prompt"]
    assert checks.check_completions(body, 3, max_tokens=1) == ["choice indexes [1, 0] for 3 prompts"]
    short = {**body, "choices": [choice(0, "A a", []), choice(1, "B b", ["b"])]}
    assert checks.check_completions(short, 2, max_tokens=1, logprobs=True) == ["1 logprobs for 2 completion tokens"]


def test_interactive_history_must_grow_exactly(checks):
    turn = [json.dumps({"text": "Hi", "tokens": 1, "input_tokens": 7, "history_tokens": 20, "finish_reason": None}),
            json.dumps({"text": "!", "tokens": 2, "input_tokens": 7, "history_tokens": 20, "finish_reason": "stop"})]
    last, problems = checks.check_interactive_stream(turn, history_before=20)
    assert problems == [] and last["tokens"] == 2
    _, problems = checks.check_interactive_stream(turn, history_before=19)
    assert problems == ["history_tokens 20, expected 19"]
    _, problems = checks.check_interactive_stream(turn[:1], history_before=20)
    assert problems == ["finish_reason None (None)"]


def test_retokenized_counts_allow_a_token_or_five_percent(checks):
    assert checks.check_retokenized("text", 48, "length", 49) == []
    assert checks.check_retokenized("text", 22, "stop", 21) == []  # the stop token is not in the text
    assert checks.check_retokenized("text", 100, "length", 105) == []
    assert checks.check_retokenized("text", 48, "length", 24)  # usage counted twice, or text lost


def test_a_character_emitted_byte_by_byte_may_retokenize_whole(checks):
    # "你好" is 6 UTF-8 bytes: a model may emit 6 byte tokens that the tokenizer writes as 2.
    assert checks.check_retokenized("你好", 6, "length", 2) == []
    assert checks.check_retokenized("ab", 6, "length", 2)  # ASCII gets no such allowance


def test_errors_must_have_their_status_and_shape(checks):
    body = {"error": {"message": "bad", "type": "invalid_request_error", "code": 400}}
    assert checks.check_error(400, body, 400) == []
    assert checks.check_error(500, body, 400) == ["status 500, expected 400"]
    assert checks.check_error(400, {"detail": "bad"}, 400) == ["not an OpenAI error body: {'detail': 'bad'}"]
