"""``stop`` strings on a live tiny server: the text is cut exactly where the
first one begins (or ends, with ``include_stop_str_in_output``), streamed or not."""

import codecs

import pytest

from conftest import post, stream
from tiny_api import MESSAGES, PROMPT, chat, complete, pick_stop, streamed_finishes, streamed_texts
from tiny_api import greedy  # noqa: F401  (a fixture: tests name it as an argument)


def chat_token_starts(content: list[dict]) -> list[int]:
    """Where each token of chat ``logprobs.content`` starts in the text, from its bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, offset = [], 0
    for entry in content:
        starts.append(offset)
        offset += len(decoder.decode(bytes(entry["bytes"])))
    return starts


def test_the_greedy_text_is_usable(greedy):
    text, tokens, starts = greedy
    assert len(tokens) == 40 and len(text) > 20


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_cuts_the_text_exactly(tiny_server, greedy, include):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=stop, include_stop_str_in_output=include)
    choice = reply["choices"][0]
    end = text.find(stop) + (len(stop) if include else 0)
    assert choice["text"] == text[:end]
    assert choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 40  # the generation ended there


@pytest.mark.parametrize("include", [False, True])
def test_a_list_of_stop_strings_cuts_at_the_earliest(tiny_server, greedy, include):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    later = text[text.find(stop) + len(stop):][:3]
    assert later and later not in text[: text.find(stop) + len(stop)]
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=[later, "never-there", stop],
                     include_stop_str_in_output=include)
    end = text.find(stop) + (len(stop) if include else 0)
    assert reply["choices"][0]["text"] == text[:end]


@pytest.mark.parametrize("include", [False, True])
def test_streamed_stop_equals_non_streamed(tiny_server, greedy, include):
    text, tokens, starts = greedy
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop": [pick_stop(text, starts)], "include_stop_str_in_output": include}
    whole = post(tiny_server, "/v1/completions", body)
    payloads = stream(tiny_server, "/v1/completions", body)
    assert streamed_texts(payloads, chat=False) == {0: whole["choices"][0]["text"]}
    assert streamed_finishes(payloads) == {0: ["stop"]}


def test_chat_stop_streamed_and_not(tiny_server):
    reply = chat(tiny_server, max_tokens=40, ignore_eos=True, logprobs=True)
    text = reply["choices"][0]["message"]["content"]
    stop = pick_stop(text, chat_token_starts(reply["choices"][0]["logprobs"]["content"]), length=3)
    stopped = chat(tiny_server, max_tokens=40, ignore_eos=True, stop=stop)
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    payloads = stream(tiny_server, "/v1/chat/completions",
                      {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 40,
                       "ignore_eos": True, "stop": stop})
    assert streamed_texts(payloads, chat=True) == {0: text[: text.find(stop)]}
    assert streamed_finishes(payloads) == {0: ["stop"]}


def test_n_choices_with_a_stop_string(tiny_server, greedy):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "n": 2, "stop": stop}
    whole = post(tiny_server, "/v1/completions", body)
    assert [c["text"] for c in whole["choices"]] == [text[: text.find(stop)]] * 2
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {
        0: text[: text.find(stop)], 1: text[: text.find(stop)]}


def test_a_stop_string_held_back_at_the_end_is_released(tiny_server, greedy):
    """The text's tail may begin a stop string; when the length limit comes first, it is still sent."""
    text, _, _ = greedy
    stop = text[-2:] + "\x00\x00\x00"
    assert stop not in text
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": stop}
    reply = post(tiny_server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == text and reply["choices"][0]["finish_reason"] == "length"
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {0: text}


def test_a_stop_string_absent_from_the_text_changes_nothing(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=["\x00\x01never\x02"])
    assert reply["choices"][0]["text"] == text
