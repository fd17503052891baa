"""Completions' ``prompt`` shapes on a live tiny server: a string, a list of
strings, token ids, a list of token-id lists."""

from conftest import post, stream
from tiny_api import PROMPT, complete, streamed_texts, token_count


def test_prompt_as_a_list_of_strings(tiny_server):
    prompts = ["abc", PROMPT, "def f(x):"]
    alone = [complete(tiny_server, p, max_tokens=4, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    reply = complete(tiny_server, prompts, max_tokens=4, ignore_eos=True, n=2)
    assert [c["index"] for c in reply["choices"]] == list(range(6))
    assert [c["text"] for c in reply["choices"]] == [text for text in alone for _ in range(2)]
    assert reply["usage"]["prompt_tokens"] == sum(token_count(tiny_server, prompt=p) for p in prompts)
    assert reply["usage"]["completion_tokens"] == 6 * 4


def test_prompt_as_token_ids_equals_the_string(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    by_ids = complete(tiny_server, ids, max_tokens=6, ignore_eos=True)
    by_text = complete(tiny_server, PROMPT, max_tokens=6, ignore_eos=True)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_prompt_as_a_list_of_token_id_lists(tiny_server):
    prompts = ["abc", PROMPT]
    ids = [post(tiny_server, "/tokenize", {"prompt": p})["tokens"] for p in prompts]
    alone = [complete(tiny_server, p, max_tokens=3, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    reply = complete(tiny_server, ids, max_tokens=3, ignore_eos=True, n=2)
    assert [(c["index"], c["text"]) for c in reply["choices"]] == [
        (0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    assert reply["usage"]["prompt_tokens"] == sum(map(len, ids))
    payloads = stream(tiny_server, "/v1/completions", {"model": "tiny", "prompt": ids, "temperature": 0,
                                                       "max_tokens": 3, "ignore_eos": True, "n": 2})
    assert streamed_texts(payloads, chat=False) == {c["index"]: c["text"] for c in reply["choices"]}


def test_a_prompt_list_with_one_prompt_too_long_is_refused_whole(tiny_server):
    body = {"model": "tiny", "prompt": [[97, 98, 99], list(range(300))]}
    error = post(tiny_server, "/v1/completions", body, status=400)
    assert error["param"] == "prompt" and "context length" in error["message"]
