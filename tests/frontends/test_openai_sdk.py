"""The official openai SDK, sync and async, against the tiny server.

Every body and every stream chunk is validated from its raw JSON with the
SDK's own pydantic types, and the usage it reports is checked exactly.
"""

import asyncio
import json
from typing import Literal

import httpx
import openai
import pytest
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
PROMPT = "The quick brown fox"


class StreamedCompletionChoice(CompletionChoice):
    """The SDK's choice with ``finish_reason`` optional: OpenAI's own streams send
    ``null`` before the last chunk (the SDK parses stream chunks without validation)."""

    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class StreamedCompletion(Completion):
    choices: list[StreamedCompletionChoice]


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def sse_payloads(lines) -> list:
    """The JSON payloads of an SSE stream; asserts it ends with ``[DONE]``."""
    events = [line for line in lines if line]
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(event[len("data: "):]) for event in events[:-1]]


def tokenize(server, **body) -> int:
    response = httpx.post(server.base_url + "/tokenize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def check_usage(usage, prompt_tokens: int, completion_tokens: int) -> None:
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == prompt_tokens + completion_tokens


def check_chat_chunks(payloads: list, *, n: int = 1, include_usage: bool = False) -> list[ChatCompletionChunk]:
    chunks = [ChatCompletionChunk.model_validate(payload) for payload in payloads]
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == "tiny" for chunk in chunks)
    choice_chunks = [chunk for chunk in chunks if chunk.choices]
    assert all(len(chunk.choices) == 1 for chunk in choice_chunks)
    for index in range(n):
        mine = [chunk.choices[0] for chunk in choice_chunks if chunk.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        finishes = [choice.finish_reason for choice in mine if choice.finish_reason is not None]
        assert len(finishes) == 1 and mine[-1].finish_reason in ("stop", "length")
    assert {chunk.choices[0].index for chunk in choice_chunks} == set(range(n))
    if include_usage:
        assert all("usage" in payload for payload in payloads)
        assert all(chunk.usage is None for chunk in chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
    else:
        assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    return chunks


def check_completion_chunks(payloads: list, *, include_usage: bool = False) -> list[StreamedCompletion]:
    chunks = [StreamedCompletion.model_validate(payload) for payload in payloads]
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "text_completion" and chunk.model == "tiny" for chunk in chunks)
    finished = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason is not None]
    assert len(finished) == 1
    Completion.model_validate(payloads[chunks.index(finished[0])])  # the last one passes the strict type
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(chunk.usage is None for chunk in chunks[:-1])
    return chunks


def chat_text(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


# ----------------------------------------------------------------------------- sync


def test_sync_chat_body_validates(client, tiny_server):
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0
    ) as response:
        assert response.status_code == 200
        reply = ChatCompletion.model_validate(response.json())
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].logprobs is None
    check_usage(reply.usage, tokenize(tiny_server, messages=MESSAGES), reply.usage.completion_tokens)
    assert 1 <= reply.usage.completion_tokens <= 5
    # The SDK's parsed object is the same.
    parsed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    assert parsed.choices[0].message.content == reply.choices[0].message.content


def test_sync_completion_body_validates(client, tiny_server):
    with client.completions.with_streaming_response.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0
    ) as response:
        reply = Completion.model_validate(response.json())
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].index == 0 and reply.choices[0].logprobs is None
    check_usage(reply.usage, tokenize(tiny_server, prompt=PROMPT), reply.usage.completion_tokens)
    parsed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    assert parsed.choices[0].text == reply.choices[0].text


def test_sync_chat_stream_chunks_validate_and_usage_is_exact(client, tiny_server):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 7, "temperature": 0, "logprobs": True,
              "extra_body": {"ignore_eos": True}}
    with client.chat.completions.with_streaming_response.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = check_chat_chunks(sse_payloads(response.iter_lines()), include_usage=True)
    streamed_tokens = sum(len(chunk.choices[0].logprobs.content) for chunk in chunks
                          if chunk.choices and chunk.choices[0].logprobs)
    assert streamed_tokens == 7
    check_usage(chunks[-1].usage, tokenize(tiny_server, messages=MESSAGES), 7)
    assert chunks[-2].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(**kwargs)
    assert chat_text(chunks) == whole.choices[0].message.content
    assert whole.usage == chunks[-1].usage


def test_sync_completion_stream_chunks_validate_and_usage_is_exact(client, tiny_server):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0,
              "extra_body": {"ignore_eos": True}}
    with client.completions.with_streaming_response.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    ) as response:
        chunks = check_completion_chunks(sse_payloads(response.iter_lines()), include_usage=True)
    with_choices = [chunk for chunk in chunks if chunk.choices]
    # LMDeploy's shape: the finish comes alone, with text "" and no logprobs
    assert with_choices[-1].choices[0].text == "" and with_choices[-1].choices[0].logprobs is None
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert sum(len(chunk.choices[0].logprobs.tokens) for chunk in with_choices[:-1]) == 6
    check_usage(chunks[-1].usage, tokenize(tiny_server, prompt=PROMPT), 6)
    whole = client.completions.create(**kwargs)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text


def test_sync_streams_through_the_sdk_parser(client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert chunks[-1].usage.completion_tokens <= 4
    texts = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(isinstance(chunk, Completion) for chunk in texts)


def test_stream_without_include_usage_has_no_usage(client):
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=MESSAGES, max_tokens=3, stream=True
    ) as response:
        payloads = sse_payloads(response.iter_lines())
    check_chat_chunks(payloads)
    assert all(payload.get("usage") is None for payload in payloads)


def test_stream_with_include_usage_false_has_no_usage_chunk(client):
    with client.completions.with_streaming_response.create(
        model="tiny", prompt=PROMPT, max_tokens=3, stream=True, stream_options={"include_usage": False}
    ) as response:
        chunks = check_completion_chunks(sse_payloads(response.iter_lines()))
    assert all(chunk.choices for chunk in chunks)


def test_n_choices_stream_with_usage(client, tiny_server):
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=0.8, seed=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ) as response:
        chunks = check_chat_chunks(sse_payloads(response.iter_lines()), n=2, include_usage=True)
    check_usage(chunks[-1].usage, tokenize(tiny_server, messages=MESSAGES), 8)


def test_sdk_errors_carry_the_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)
    assert caught.value.param == "temperature" and caught.value.type == "invalid_request_error"
    assert caught.value.code == "400"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-9", prompt="x")
    assert caught.value.param == "model" and caught.value.message.endswith("The model 'gpt-9' does not exist.")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, top_p=0)
    assert caught.value.param == "top_p"


def test_sdk_models(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny"]
    assert client.models.list().data[0].owned_by == "lmserve"


# ---------------------------------------------------------------------------- async


def test_async_chat_and_completion_bodies_validate(tiny_server):
    async def main():
        async with async_client(tiny_server) as client:
            async with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=MESSAGES, max_tokens=5, temperature=0
            ) as response:
                chat = ChatCompletion.model_validate(await response.json())
            async with client.completions.with_streaming_response.create(
                model="tiny", prompt=PROMPT, max_tokens=5, temperature=0
            ) as response:
                completion = Completion.model_validate(await response.json())
            parsed = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                                          temperature=0)
            return chat, completion, parsed

    chat, completion, parsed = asyncio.run(main())
    assert chat.choices[0].message.content == parsed.choices[0].message.content
    assert chat.usage.prompt_tokens == tokenize(tiny_server, messages=MESSAGES)
    assert completion.usage.prompt_tokens == tokenize(tiny_server, prompt=PROMPT)


def test_async_streams_validate_and_usage_is_exact(tiny_server):
    async def main():
        async with async_client(tiny_server) as client:
            async with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            ) as response:
                chat = [line async for line in response.iter_lines()]
            async with client.completions.with_streaming_response.create(
                model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            ) as response:
                completion = [line async for line in response.iter_lines()]
            parsed = [chunk async for chunk in await client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
                extra_body={"ignore_eos": True})]
            return chat, completion, parsed

    chat, completion, parsed = asyncio.run(main())
    chat_chunks = check_chat_chunks(sse_payloads(chat), include_usage=True)
    check_usage(chat_chunks[-1].usage, tokenize(tiny_server, messages=MESSAGES), 5)
    assert chat_text(parsed) == chat_text(chat_chunks)
    completion_chunks = check_completion_chunks(sse_payloads(completion), include_usage=True)
    check_usage(completion_chunks[-1].usage, tokenize(tiny_server, prompt=PROMPT), 5)


def test_async_concurrent_requests(tiny_server):
    """Several requests at once through one async client: each gets its own greedy text."""

    async def main():
        async with async_client(tiny_server) as client:
            replies = await asyncio.gather(*(
                client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
                for prompt in ("abc", "The dog", "abc", "def f(x):")
            ))
            return [reply.choices[0].text for reply in replies]

    texts = asyncio.run(main())
    assert texts[0] == texts[2]
    sync = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="unused", max_retries=0)
    alone = sync.completions.create(model="tiny", prompt="The dog", max_tokens=6, temperature=0)
    assert texts[1] == alone.choices[0].text
