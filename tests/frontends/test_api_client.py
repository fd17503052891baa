"""The Python APIClient against a live server: the seed's snippets, streams, errors as dicts."""

import pytest

from conftest import free_port
from lmserve.frontends.api_client import APIClient


@pytest.fixture(scope="module")
def api_client(tiny_server):
    with APIClient(tiny_server.base_url) as client:
        yield client


def test_the_seeds_chat_completions_snippet(api_client):
    model_name = api_client.available_models[0]
    messages = [{"role": "user", "content": "Say this is a test!"}]
    items = list(api_client.chat_completions_v1(model=model_name, messages=messages, max_tokens=8))
    assert len(items) == 1
    reply = items[0]
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert 0 < reply["usage"]["completion_tokens"] <= 8


def test_the_seeds_completions_snippet(api_client):
    model_name = api_client.available_models[0]
    items = list(api_client.completions_v1(model=model_name, prompt="hi"))
    assert len(items) == 1 and items[0]["object"] == "text_completion"
    assert items[0]["usage"]["completion_tokens"] <= 16  # the client's default max_tokens


def test_streams_yield_every_chunk_and_add_up_to_the_body(api_client):
    common = dict(model="tiny", prompt="abc", max_tokens=6, temperature=0, ignore_eos=True)
    whole = next(api_client.completions_v1(**common))["choices"][0]["text"]
    chunks = list(api_client.completions_v1(**common, stream=True))
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    chat_chunks = list(api_client.chat_completions_v1(model="tiny", messages="raw", max_tokens=4, stream=True,
                                                      logprobs=True, top_logprobs=2))
    assert chat_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(chunk["choices"][0]["logprobs"] for chunk in chat_chunks[1:])


def test_errors_are_yielded_not_raised(api_client):
    items = list(api_client.chat_completions_v1(model="no-such-model", messages=[{"role": "user", "content": "x"}]))
    assert items[0]["code"] == 404 and items[0]["error"]["param"] == "model"
    items = list(api_client.completions_v1(model="tiny", prompt="x", temperature=5))
    assert items[0]["code"] == 400 and items[0]["param"] == "temperature"


def test_extra_keyword_arguments_travel_under_kwargs_and_are_ignored(api_client):
    items = list(api_client.chat_completions_v1(model="tiny", messages="x", max_tokens=2, adapter_name="none"))
    assert items[0]["object"] == "chat.completion"


def test_encode(api_client):
    ids, length = api_client.encode("hello world")
    assert length == len(ids) > 0
    ids, lengths = api_client.encode(["a", "bc"], add_bos=False)
    assert lengths == [len(item) for item in ids]


def test_available_models_is_none_when_the_server_cannot_be_reached():
    assert APIClient(f"http://127.0.0.1:{free_port()}").available_models is None
