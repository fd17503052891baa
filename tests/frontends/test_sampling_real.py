"""Truncated sampling on the real model through HTTP: a ``top_p`` below the top token's
probability is greedy, whatever the temperature or ``top_k`` beside it, and LMDeploy's own
REST suite's sampling checks (its ``test_minimum_topp`` cases, through its APIClient
signature and the openai client, streamed and not) hold."""

from __future__ import annotations

import openai
import pytest

from lmserve.frontends.api_client import APIClient

pytestmark = pytest.mark.real_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHANGHAI = [{"role": "user", "content": "Shanghai is"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="unused")


def reply(client, top_k: int | None = None, **fields) -> str:
    fields = {"model": MODEL, "messages": SHANGHAI, "max_tokens": 24, **fields}
    if top_k is not None:
        fields["extra_body"] = {"top_k": top_k}
    return client.chat.completions.create(**fields).choices[0].message.content


def test_twenty_requests_with_a_tiny_top_p_return_the_greedy_reply(client):
    greedy = reply(client, temperature=0)
    assert greedy
    replies = [reply(client, top_p=1e-10) for _ in range(20)]
    assert replies == [greedy] * 20


@pytest.mark.parametrize("fields", [
    {"top_p": 0.01}, {"top_p": 1e-10, "temperature": 0.5}, {"top_p": 1e-10, "top_k": 40},
    {"top_p": 0.001, "seed": 1}, {"top_k": 1, "temperature": 1.5},
])
def test_other_near_greedy_settings_return_the_greedy_reply(client, fields):
    greedy = reply(client, temperature=0)
    assert [reply(client, **fields) for _ in range(4)] == [greedy] * 4


def test_lmdeploy_minimum_topp_through_its_api_client(smollm2_server):
    """LMDeploy's test_minimum_topp and test_minimum_topp_streaming (APIClient)."""
    api_client = APIClient(smollm2_server.base_url)
    model_name = api_client.available_models[0]
    texts = []
    for _ in range(3):
        for output in api_client.chat_completions_v1(model=model_name, messages=SHANGHAI, top_p=0.0000000001,
                                                     max_tokens=10):
            texts.append(output["choices"][0]["message"]["content"])
    assert texts[0] == texts[1] == texts[2]
    streamed = []
    for _ in range(3):
        chunks = list(api_client.chat_completions_v1(
            model=model_name, messages=[{"role": "user", "content": "Hi, pls intro yourself"}], stream=True,
            top_p=0.0000000001, max_tokens=10))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        streamed.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))
    assert streamed[0] == streamed[1] == streamed[2]


def test_lmdeploy_minimum_topp_through_the_openai_client(client):
    """LMDeploy's test_minimum_topp and test_minimum_topp_streaming (openai)."""
    texts = [reply(client, temperature=0.01, top_p=0.0000000001, max_tokens=10) for _ in range(3)]
    assert texts[0] == texts[1] == texts[2]
    streamed = []
    for _ in range(3):
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi, pls intro yourself"}],
                                                top_p=0.0000000001, max_tokens=10, stream=True)
        streamed.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert streamed[0] == streamed[1] == streamed[2]
