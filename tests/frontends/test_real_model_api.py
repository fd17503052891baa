"""The API's features on the real model: stop strings that span several tokens, n seeded choices."""

import functools

import pytest

import conftest

pytestmark = pytest.mark.real_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Describe the city of Paris in a few sentences."}]
PROMPT = "The history of the city of Paris begins"


post = functools.partial(conftest.post, timeout=300)  # the real model on a shared CPU
stream = functools.partial(conftest.stream, timeout=300)


def streamed(payloads: list[dict], chat: bool) -> tuple[str, list[str]]:
    """The concatenated deltas of choice 0 and its finish reasons."""
    text, finishes = "", []
    for payload in payloads:
        for choice in payload["choices"]:
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    return text, finishes


def pick_stop(server, text: str, tokens: list[str]) -> str:
    """A piece of ``text``'s middle that spans a token boundary, is at least two
    tokens long by /tokenize and does not occur earlier."""
    offset = 0
    for token in tokens:
        if text[offset:offset + len(token)] != token:
            break
        offset += len(token)
        start = offset - 5
        stop = text[start:start + 10]
        if start < len(text) // 3 or len(stop) < 10 or text.find(stop) != start or "\ufffd" in stop:
            continue
        count = post(server, "/tokenize", {"prompt": stop, "add_special_tokens": False})["count"]
        if count >= 2:
            return stop
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.fixture(scope="module")
def chat_greedy(smollm2_server):
    reply = post(smollm2_server, "/v1/chat/completions",
                 {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 60, "logprobs": True})
    choice = reply["choices"][0]
    return choice["message"]["content"], [entry["token"] for entry in choice["logprobs"]["content"]]


@pytest.fixture(scope="module")
def completion_greedy(smollm2_server):
    reply = post(smollm2_server, "/v1/completions",
                 {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 60, "logprobs": 0})
    choice = reply["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"]


@pytest.mark.parametrize("include", [False, True])
def test_chat_stop_string_over_several_tokens(smollm2_server, chat_greedy, include):
    text, tokens = chat_greedy
    stop = pick_stop(smollm2_server, text, tokens)
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 60, "stop": [stop],
            "include_stop_str_in_output": include}
    expected = text[: text.find(stop) + (len(stop) if include else 0)]
    reply = post(smollm2_server, "/v1/chat/completions", body)
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert streamed(stream(smollm2_server, "/v1/chat/completions", body), chat=True) == (expected, ["stop"])


def test_completion_stop_string_over_several_tokens(smollm2_server, completion_greedy):
    text, tokens = completion_greedy
    stop = pick_stop(smollm2_server, text, tokens)
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 60, "stop": stop}
    reply = post(smollm2_server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == text[: text.find(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < len(tokens)
    assert streamed(stream(smollm2_server, "/v1/completions", body), chat=False) == (text[: text.find(stop)], ["stop"])


def test_n_seeded_choices_differ_and_are_reproducible(smollm2_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
            "temperature": 1.0, "max_tokens": 24, "n": 2, "seed": 42}
    first = post(smollm2_server, "/v1/chat/completions", body)
    second = post(smollm2_server, "/v1/chat/completions", body)
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1]
    assert texts[0] != texts[1]
    assert [choice["message"]["content"] for choice in second["choices"]] == texts
    assert first["usage"]["prompt_tokens"] == post(smollm2_server, "/tokenize",
                                                   {"messages": body["messages"]})["count"]
