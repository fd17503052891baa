"""The server on a model whose tokenizer is SentencePiece-style BPE (Gemma 2's kind).

A tiny random Gemma 2 with a sentencepiece tokenizer trained here (byte fallback,
no dummy prefix): the built-in loader reads its ``tokenizer.json``, and the
server's tokenization routes and completions agree with HF ``tokenizers`` and
HF ``generate`` on the same files.
"""

from __future__ import annotations

import json

import pytest
from lmserve.plugins.tokenizer_files import tokenizer_from_path

from tests.backends.families.test_gemma2 import TINY, WEIGHTS
from tests.conftest import post, stream
from tests.family_checks import (
    PROMPTS,
    hf_greedy,
    load_hf_model,
    server_greedy_texts,
    write_family_model,
    write_sentencepiece_tokenizer,
)

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TEXTS = ["Hello  wörld 😀, the dog\n\tand 机器", " leading and trailing ", "a<s>b </s> c"]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma2-sentencepiece")
    tokenizer = write_sentencepiece_tokenizer(directory)
    config_path = directory / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": TEMPLATE}))
    write_family_model(directory, "Gemma2Config", tokenizer=tokenizer, query_pre_attn_scalar=16, seed=1,
                       **WEIGHTS, **TINY)
    return directory


@pytest.fixture(scope="module")
def server(gemma2, lmserve_server_factory):
    server = lmserve_server_factory(model=gemma2)
    yield server
    server.stop()


def test_tokenization_routes_agree_with_hf(gemma2, server):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(gemma2 / "tokenizer.json"))
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"] == expected
        with_bos = post(server, "/tokenize", {"prompt": text})["tokens"]
        assert with_bos == hf.encode(text).ids == [2, *expected]
        detokenized = post(server, "/detokenize", {"tokens": with_bos})["prompt"]
        assert detokenized == hf.decode(with_bos, skip_special_tokens=False) == "<s>" + text
    assert any(hf.id_to_token(i).startswith("<0x") for i in hf.encode(TEXTS[0]).ids)  # byte fallback in use

    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": TEXTS[0]}]})["tokens"]
    assert chat[0] == 2 and chat.count(2) == 1  # the template's BOS, once
    assert hf.decode(chat) == f"<start_of_turn>user\n{TEXTS[0]}<end_of_turn>\n<start_of_turn>model\n"


def test_completions_equal_hf_generate(gemma2, server):
    """Greedy completions of token prompts: the server's text is HF ``generate``'s tokens decoded.

    (The random model writes byte tokens that are no UTF-8. HF's ``ByteFallback`` decoder
    makes every byte of such a run U+FFFD; ours, as for byte-level BPE and as it streams,
    replaces the invalid parts only, so the reference decode here is ours.)"""
    hf_model = load_hf_model(gemma2)
    tokens = [hf_greedy(hf_model, ids) for ids in PROMPTS]
    tokenizer = tokenizer_from_path(gemma2)
    assert server_greedy_texts(server, concurrently=False) == [tokenizer.decode(ids) for ids in tokens]
    assert all(any(tokenizer.id_to_token(i).startswith("<0x") for i in ids) for ids in tokens)


def test_chat_round_trip_streams_what_it_answers(server):
    body = {"model": server.client().get("/v1/models").json()["data"][0]["id"], "max_tokens": 24,
            "temperature": 0, "messages": [{"role": "user", "content": TEXTS[0]}]}
    answer = post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    deltas = [event["choices"][0]["delta"].get("content") or "" for event in stream(server, "/v1/chat/completions", body)
              if event.get("choices")]
    assert answer and "".join(deltas) == answer
