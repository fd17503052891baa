"""LMDeploy's wire details, through raw HTTP, LMDeploy's APIClient shapes and the openai SDK.

Clients written against LMDeploy's api_server read these exact shapes: every chat
chunk's delta carries the role and a content string; the finish arrives in a chunk
of its own; request fields are parsed leniently; errors carry LMDeploy's flat
fields and OpenAI's nested object together.
"""

import httpx
import openai
import pytest

from conftest import post, stream
from lmserve.frontends.api_client import APIClient
from tiny_api import MESSAGES, PROMPT

CHAT = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
COMPLETION = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
ERROR_FIELDS = {"object", "message", "type", "param", "code"}


# ------------------------------------------------------------------ chat streams


def test_every_chat_chunk_carries_the_role_and_a_content_string(tiny_server):
    chunks = stream(tiny_server, "/v1/chat/completions", CHAT)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        delta = chunk["choices"][0]["delta"]
        assert delta["role"] == "assistant" and isinstance(delta["content"], str), chunk


def test_the_chat_finish_comes_in_a_last_chunk_of_its_own(tiny_server):
    chunks = stream(tiny_server, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2})
    *body, last = chunks
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0]["logprobs"] is None
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in body)
    # the text and its logprobs came before it: six tokens, one logprob record each
    records = [record for chunk in body if chunk["choices"][0]["logprobs"]
               for record in chunk["choices"][0]["logprobs"]["content"]]
    assert len(records) == 6 and "".join(chunk["choices"][0]["delta"]["content"] for chunk in body)


def test_chat_usage_follows_the_finish_when_asked(tiny_server):
    chunks = stream(tiny_server, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}})
    *body, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] == "length" and finish["usage"] is None
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(chunk["usage"] is None for chunk in body)


# ------------------------------------------------------------ completion streams


def test_completion_chunks_are_text_completions_and_finish_in_an_empty_chunk(tiny_server):
    chunks = stream(tiny_server, "/v1/completions", COMPLETION)
    *body, last = chunks
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert last["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in body)
    assert "".join(chunk["choices"][0]["text"] for chunk in body) == \
        post(tiny_server, "/v1/completions", COMPLETION)["choices"][0]["text"]


# --------------------------------------------------------------- lax parsing


def test_strings_that_lax_parsing_reads_as_values_are_taken(tiny_server):
    with httpx.stream("POST", tiny_server.base_url + "/v1/chat/completions",
                      json={**CHAT, "stream": "true", "max_tokens": "4", "temperature": "0"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    reply = post(tiny_server, "/v1/completions", {**COMPLETION, "max_tokens": "4", "ignore_eos": "true"})
    assert reply["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("field, value", [("max_tokens", "sixteen"), ("stream", "maybe"),
                                          ("temperature", [0.5]), ("n", 1.5)])
def test_what_lax_parsing_refuses_is_a_400_naming_the_field(tiny_server, field, value):
    response = httpx.post(tiny_server.base_url + "/v1/chat/completions", json={**CHAT, field: value}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["param"] == field


def test_logit_bias_past_100_is_clamped_not_refused(tiny_server):
    body = {**COMPLETION, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    clamped = post(tiny_server, "/v1/completions", {**body, "logit_bias": {"97": 1000}})
    at_limit = post(tiny_server, "/v1/completions", {**body, "logit_bias": {"97": 100}})
    assert clamped["choices"][0]["text"] == at_limit["choices"][0]["text"] == "aaaa"


# ------------------------------------------------------- repetition_penalty, length


@pytest.mark.parametrize("penalty", [1e-7, 0.5, 2.5, 10])
def test_any_positive_repetition_penalty_is_served(tiny_server, penalty):
    reply = post(tiny_server, "/v1/chat/completions", {**CHAT, "repetition_penalty": penalty, "temperature": 0.7,
                                                         "seed": 1})
    assert reply["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("penalty", [0, -1])
def test_a_repetition_penalty_that_is_not_positive_is_a_400(tiny_server, penalty):
    response = httpx.post(tiny_server.base_url + "/v1/chat/completions",
                          json={**CHAT, "repetition_penalty": penalty}, timeout=60)
    assert response.status_code == 400 and response.json()["param"] == "repetition_penalty"


def test_max_tokens_past_the_context_runs_until_the_context_is_full(tiny_server):
    context = post(tiny_server, "/tokenize", {"prompt": PROMPT})
    room = context["max_model_len"] - context["count"]
    reply = post(tiny_server, "/v1/completions", {**COMPLETION, "max_tokens": room + 1000}, timeout=300)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == room


def test_a_prompt_that_alone_does_not_fit_is_a_400_about_the_context_length(tiny_server):
    context = post(tiny_server, "/tokenize", {"prompt": "a"})
    response = httpx.post(tiny_server.base_url + "/v1/completions",
                          json={**COMPLETION, "prompt": [5] * context["max_model_len"]}, timeout=60)
    assert response.status_code == 400 and "context length" in response.json()["message"]


# ------------------------------------------------------------------------ errors


def test_errors_carry_the_flat_and_the_nested_shape(tiny_server):
    response = httpx.post(tiny_server.base_url + "/v1/chat/completions", json={**CHAT, "model": "nope"}, timeout=60)
    body = response.json()
    assert response.status_code == 404
    assert ERROR_FIELDS <= body.keys() and body["code"] == 404 and body["object"] == "error"
    assert body["error"] == {key: body[key] for key in ERROR_FIELDS}


def test_the_openai_sdk_exposes_the_nested_error_as_the_body(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_p=0)
    assert ERROR_FIELDS <= info.value.body.keys()
    assert info.value.body["object"] == "error" and info.value.body["param"] == "top_p"
    assert info.value.body["code"] == 400


# ------------------------------------------------------------ LMDeploy's client


def test_lmdeploys_apiclient_streams_read_the_same_shapes(tiny_server):
    with APIClient(tiny_server.base_url) as client:
        items = list(client.chat_completions_v1(model="tiny", messages=MESSAGES, max_tokens=5, stream=True,
                                                temperature=0, ignore_eos=True))
        completions = list(client.completions_v1(model="tiny", prompt=PROMPT, max_tokens=5, stream=True,
                                                 temperature=0, ignore_eos=True))
    assert all(item["choices"][0]["delta"]["role"] == "assistant" for item in items)
    assert items[-1]["choices"][0]["finish_reason"] == "length" and items[-1]["choices"][0]["delta"]["content"] == ""
    assert completions[-1]["choices"][0]["text"] == "" and completions[-1]["choices"][0]["finish_reason"] == "length"
    assert all(item["object"] == "text_completion" for item in completions)
