"""The real model behind a live server, through the official openai client."""

import openai
import pytest

pytestmark = pytest.mark.real_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="unused")


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_coherent_chat_answer_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                  temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kwargs)
    answer = whole.choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == answer


def test_completions_continue_text(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in reply.choices[0].text


def test_streamed_emoji_and_cjk_never_contain_replacement_chars(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat exactly: 你好，世界！🙂🎉 こんにちは 😀👍🏽"}],
        temperature=0, max_tokens=48, stream=True,
    )
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    text = "".join(deltas)
    assert any(ord(ch) > 0x2E80 for ch in text), f"expected CJK or emoji in {text!r}"
    assert all("\ufffd" not in d for d in deltas)


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                  temperature=1.0, top_p=0.9, max_tokens=24, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second
