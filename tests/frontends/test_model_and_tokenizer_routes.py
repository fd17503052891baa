"""The routes about the model and its tokenizer on a live tiny server:
``/v1/encode``, ``/tokenize``, ``/detokenize`` and ``/v1/models``."""

import httpx
import pytest

from conftest import post
from tiny_api import BOS, MESSAGES, chat


def test_encode_a_string_and_a_list(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})["tokens"]
    reply = post(tiny_server, "/v1/encode", {"input": "hello world"})
    assert reply == {"input_ids": [BOS, *ids], "length": len(ids) + 1}
    reply = post(tiny_server, "/v1/encode", {"input": "hello world", "add_bos": False})
    assert reply == {"input_ids": ids, "length": len(ids)}
    reply = post(tiny_server, "/v1/encode", {"input": ["hello world", "ab"], "add_bos": False})
    ab = post(tiny_server, "/tokenize", {"prompt": "ab", "add_special_tokens": False})["tokens"]
    assert reply == {"input_ids": [ids, ab], "length": [len(ids), len(ab)]}


def test_encode_do_preprocess_renders_a_user_turn(tiny_server):
    reply = post(tiny_server, "/v1/encode", {"input": "hello there", "do_preprocess": True})
    expected = post(tiny_server, "/tokenize", {"messages": MESSAGES})["tokens"]
    assert reply == {"input_ids": expected, "length": len(expected)}
    assert chat(tiny_server, max_tokens=1)["usage"]["prompt_tokens"] == len(expected)


def test_tokenize_a_prompt_and_messages(tiny_server):
    reply = post(tiny_server, "/tokenize", {"model": "tiny", "prompt": "hello world"})
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 256
    assert reply["tokens"] == post(tiny_server, "/v1/encode", {"input": "hello world", "add_bos": False})["input_ids"]
    with_prompt = post(tiny_server, "/tokenize", {"messages": MESSAGES})
    without = post(tiny_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert with_prompt["tokens"][: without["count"]] == without["tokens"]
    assert with_prompt["count"] > without["count"]
    text = post(tiny_server, "/detokenize", {"tokens": with_prompt["tokens"]})["prompt"]
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", ["hello world", "  spaces\tand\nlines ", "你好，世界！🙂", "def f(x):\n    return x"])
def test_detokenize_round_trip(tiny_server, text):
    ids = post(tiny_server, "/tokenize", {"prompt": text})["tokens"]
    assert post(tiny_server, "/detokenize", {"model": "tiny", "tokens": ids}) == {"prompt": text}


def test_models_list_the_context_length(tiny_server):
    reply = httpx.get(tiny_server.base_url + "/v1/models", timeout=30).json()
    assert reply["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in reply["data"]] == [("tiny", "model", 256)]
