"""Every way a request can be wrong: status, OpenAI's error shape, and the ``param`` at fault.

One table of bad requests over the chat, completions and tokenizer routes,
plus unknown routes and methods. Each row also names a piece of the message
where the message matters (the context length, the unknown model).
"""

import asyncio
import json
from dataclasses import dataclass

import httpx
import pytest
from test_openai_api import assert_error

USER = [{"role": "user", "content": "x"}]
CHAT = {"model": "tiny", "messages": USER}
COMPLETION = {"model": "tiny", "prompt": "x"}
LONG_PROMPT = "word " * 300  # far over the tiny model's 256-token context


@dataclass(frozen=True)
class Raw:
    """A body sent as bytes with its own content type (None: no header at all)."""

    content: bytes
    content_type: str | None = "application/json"


def case(name, path, body, status, param, *, method="POST", message=()):
    if isinstance(message, str):
        message = (message,)
    return pytest.param(method, path, body, status, param, message, id=name)


def chat(name, fields, param, status=400, **kwargs):
    return case("chat-" + name, "/v1/chat/completions", {**CHAT, **fields}, status, param, **kwargs)


def completion(name, fields, param, status=400, **kwargs):
    return case("completion-" + name, "/v1/completions", {**COMPLETION, **fields}, status, param, **kwargs)


CONTEXT = ("context length", "256")

CASES = [
    # --- sampling ranges (SamplingParams), chat
    chat("temperature-negative", {"temperature": -0.1}, "temperature"),
    chat("temperature-over-2", {"temperature": 2.01}, "temperature"),
    chat("temperature-string", {"temperature": "hot"}, "temperature"),
    chat("top_p-zero", {"top_p": 0}, "top_p"),
    chat("top_p-over-1", {"top_p": 1.5}, "top_p"),
    chat("top_k-negative", {"top_k": -1}, "top_k"),
    chat("top_k-fraction", {"top_k": 1.5}, "top_k"),
    chat("min_p-negative", {"min_p": -0.1}, "min_p"),
    chat("min_p-over-1", {"min_p": 1.5}, "min_p"),
    chat("presence_penalty-under", {"presence_penalty": -2.1}, "presence_penalty"),
    chat("presence_penalty-over", {"presence_penalty": 2.1}, "presence_penalty"),
    chat("frequency_penalty-under", {"frequency_penalty": -3}, "frequency_penalty"),
    chat("frequency_penalty-over", {"frequency_penalty": 2.5}, "frequency_penalty"),
    chat("repetition_penalty-zero", {"repetition_penalty": 0}, "repetition_penalty"),
    chat("repetition_penalty-negative", {"repetition_penalty": -1}, "repetition_penalty"),
    chat("logit_bias-key-not-a-number", {"logit_bias": {"abc": 1}}, "logit_bias"),
    chat("logit_bias-key-negative", {"logit_bias": {"-1": 1}}, "logit_bias"),
    chat("logit_bias-key-outside-vocab", {"logit_bias": {"99999": 1}}, "logit_bias"),
    chat("logit_bias-key-superscript-digit", {"logit_bias": {"\u00b2": 1}}, "logit_bias"),
    chat("logit_bias-value-not-a-number", {"logit_bias": {"1": "much"}}, "logit_bias.1"),
    chat("logit_bias-value-string", {"logit_bias": {"1": "x"}}, "logit_bias.1"),
    chat("seed-string", {"seed": "x"}, "seed"),
    chat("stream-not-bool", {"stream": "maybe"}, "stream"),
    # --- n
    chat("n-zero", {"n": 0}, "n"),
    chat("n-negative", {"n": -1}, "n"),
    chat("n-over-128", {"n": 129}, "n"),
    completion("n-over-128", {"n": 129}, "n"),
    # --- max_tokens and the context
    chat("max_tokens-zero", {"max_tokens": 0}, "max_tokens"),
    chat("max_tokens-negative", {"max_tokens": -5}, "max_tokens"),
    chat("max_completion_tokens-zero", {"max_completion_tokens": 0}, "max_completion_tokens"),
    chat("prompt-over-context", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages",
         message=CONTEXT),
    completion("max_tokens-zero", {"max_tokens": 0}, "max_tokens"),
    completion("prompt-over-context", {"prompt": LONG_PROMPT}, "prompt", message=CONTEXT),
    completion("token-prompt-over-context", {"prompt": list(range(300))}, "prompt", message=(*CONTEXT, "300")),
    # --- min_tokens
    chat("min_tokens-negative", {"min_tokens": -1}, "min_tokens"),
    # --- lax types, as LMDeploy parses them ("16" is 16): what lax mode still rejects
    # (more in test_lmdeploy_wire.py)
    chat("max_tokens-fraction-string", {"max_tokens": "1.5"}, "max_tokens"),
    # --- stop
    chat("stop-empty-string", {"stop": ""}, "stop"),
    chat("stop-list-with-empty-string", {"stop": ["a", ""]}, "stop"),
    chat("stop-not-a-string", {"stop": 5}, "stop"),
    chat("stop-list-with-a-number", {"stop": ["a", 5]}, "stop.1"),
    completion("stop-empty-string", {"stop": ""}, "stop"),
    chat("stop-too-many-strings", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    chat("stop-string-too-long", {"stop": "x" * 257}, "stop"),
    completion("too-many-choices", {"prompt": ["a", "b", "c"], "n": 100}, "n"),
    completion("too-many-prompts", {"prompt": ["a"] * 257}, "prompt"),
    chat("stop_token_ids-outside-vocab", {"stop_token_ids": [99999]}, "stop_token_ids"),
    chat("stop_token_ids-negative", {"stop_token_ids": [-1]}, "stop_token_ids"),
    # --- logprobs
    chat("top_logprobs-without-logprobs", {"top_logprobs": 2}, "top_logprobs"),
    chat("top_logprobs-over-20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    chat("top_logprobs-negative", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    chat("logprobs-not-bool", {"logprobs": 5}, "logprobs"),
    completion("logprobs-over-20", {"logprobs": 21}, "logprobs"),
    completion("logprobs-negative", {"logprobs": -1}, "logprobs"),
    # --- stream_options, response_format
    chat("stream_options-without-stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    completion("stream_options-with-stream-false", {"stream": False, "stream_options": {"include_usage": True}},
               "stream_options"),
    chat("response_format-json_schema", {"response_format": {"type": "json_schema"}}, "response_format"),
    chat("response_format-unknown-type", {"response_format": {"type": "xml"}}, "response_format.type"),
    # --- validation comes before streaming starts: a plain JSON error, not an event
    chat("stream-temperature", {"stream": True, "temperature": 9}, "temperature"),
    # --- messages
    chat("messages-missing", {"messages": None}, "messages"),
    chat("messages-empty", {"messages": []}, "messages"),
    chat("messages-not-a-list", {"messages": {"role": "user", "content": "x"}}, "messages"),
    chat("messages-role-missing", {"messages": [{"content": "x"}]}, "messages.0.role"),
    chat("messages-role-unknown", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    chat("messages-second-role-missing", {"messages": [*USER, {"content": "y"}]}, "messages.1.role"),
    chat("messages-content-number", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    chat("messages-content-image-part",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0.type"),
    chat("model-missing", {"model": None}, "model"),
    # --- model
    chat("unknown-model", {"model": "gpt-9"}, "model", status=404, message="The model 'gpt-9' does not exist."),
    completion("unknown-model", {"model": "other"}, "model", status=404, message="The model 'other' does not exist."),
    case("tokenize-unknown-model", "/tokenize", {"model": "m", "prompt": "x"}, 404, "model",
         message="The model 'm' does not exist."),
    case("detokenize-unknown-model", "/detokenize", {"model": "m", "tokens": [1]}, 404, "model",
         message="The model 'm' does not exist."),
    # --- prompts
    completion("prompt-missing", {"prompt": None}, "prompt"),
    completion("prompt-empty-string", {"prompt": ""}, "prompt"),
    completion("prompt-empty-list", {"prompt": []}, "prompt"),
    completion("prompt-list-with-empty-ids", {"prompt": [[]]}, "prompt"),
    completion("prompt-list-with-empty-string", {"prompt": ["a", ""]}, "prompt"),
    completion("prompt-a-number", {"prompt": 5}, "prompt"),
    completion("prompt-mixed-list", {"prompt": [1, "a"]}, "prompt.0"),
    completion("prompt-token-outside-vocab", {"prompt": [99999]}, "prompt", message="99999"),
    completion("prompt-token-negative", {"prompt": [-1]}, "prompt", message="-1"),
    completion("prompt-lists-one-token-outside-vocab", {"prompt": [[1, 2], [3, 99999]]}, "prompt",
               message="99999"),
    # --- /v1/encode
    case("encode-input-missing", "/v1/encode", {}, 400, "input"),
    case("encode-input-number", "/v1/encode", {"input": 5}, 400, "input"),
    case("encode-input-list-of-numbers", "/v1/encode", {"input": [1, 2]}, 400, "input.0"),
    case("encode-add_bos-not-bool", "/v1/encode", {"input": "x", "add_bos": "maybe"}, 400, "add_bos"),
    # --- /tokenize
    case("tokenize-prompt-and-messages", "/tokenize", {"prompt": "x", "messages": USER}, 400, "prompt"),
    case("tokenize-neither", "/tokenize", {}, 400, "prompt"),
    case("tokenize-prompt-number", "/tokenize", {"prompt": 5}, 400, "prompt"),
    case("tokenize-messages-role-missing", "/tokenize", {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    # --- /detokenize
    case("detokenize-token-outside-vocab", "/detokenize", {"tokens": [1, 99999]}, 400, "tokens", message="99999"),
    case("detokenize-token-negative", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    case("detokenize-tokens-missing", "/detokenize", {}, 400, "tokens"),
    case("detokenize-tokens-string", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
    case("detokenize-token-string", "/detokenize", {"tokens": [1, "a"]}, 400, "tokens.1"),
    # --- bodies that are not a JSON object
    case("chat-malformed-json", "/v1/chat/completions", Raw(b"{nope"), 400, None, message="not valid JSON"),
    case("completion-malformed-json", "/v1/completions", Raw(b'{"model": "tiny",'), 400, None),
    case("encode-malformed-json", "/v1/encode", Raw(b"{'input': 'x'}"), 400, None),
    case("tokenize-malformed-json", "/tokenize", Raw(b"{"), 400, None),
    case("detokenize-malformed-json", "/detokenize", Raw(b"[1, 2"), 400, None),
    case("chat-empty-body", "/v1/chat/completions", Raw(b""), 400, None),
    case("chat-invalid-utf8", "/v1/chat/completions", Raw(b'{"model": "\xff"}'), 400, None),
    case("chat-text-plain", "/v1/chat/completions", Raw(json.dumps(CHAT).encode(), "text/plain"), 400, None,
         message="Content-Type"),
    case("chat-form-encoded", "/v1/chat/completions", Raw(b"model=tiny", "application/x-www-form-urlencoded"),
         400, None),
    case("completion-no-content-type", "/v1/completions", Raw(json.dumps(COMPLETION).encode(), None), 400, None),
    case("tokenize-text-plain", "/tokenize", Raw(b'{"prompt": "x"}', "text/plain"), 400, None),
    case("chat-json-array", "/v1/chat/completions", Raw(b"[1, 2]"), 400, None, message="JSON object"),
    case("completion-json-string", "/v1/completions", Raw(b'"x"'), 400, None),
    case("encode-json-null", "/v1/encode", Raw(b"null"), 400, None),
    case("detokenize-json-array", "/detokenize", Raw(b"[1, 2]"), 400, None),
    # --- routes and methods
    case("unknown-path-get", "/v1/nothing", None, 404, None, method="GET"),
    case("unknown-path-post", "/v1/nothing", {}, 404, None),
    case("unknown-v1-engines", "/v1/engines", None, 404, None, method="GET"),
    case("chat-get", "/v1/chat/completions", None, 405, None, method="GET"),
    case("completions-get", "/v1/completions", None, 405, None, method="GET"),
    case("completions-delete", "/v1/completions", None, 405, None, method="DELETE"),
    case("tokenize-get", "/tokenize", None, 405, None, method="GET"),
    case("detokenize-put", "/detokenize", {}, 405, None, method="PUT"),
    case("encode-get", "/v1/encode", None, 405, None, method="GET"),
    case("models-post", "/v1/models", {}, 405, None),
    case("health-delete", "/health", None, 405, None, method="DELETE"),
]


def send(server, method: str, path: str, body) -> httpx.Response:
    url = server.base_url + path
    if isinstance(body, Raw):
        headers = {"content-type": body.content_type} if body.content_type else {}
        return httpx.request(method, url, content=body.content, headers=headers, timeout=60)
    if body is None:
        return httpx.request(method, url, timeout=60)
    return httpx.request(method, url, json=body, timeout=60)


def test_the_table_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("method, path, body, status, param, message", CASES)
def test_bad_request(tiny_server, method, path, body, status, param, message):
    response = send(tiny_server, method, path, body)
    assert response.headers["content-type"].startswith("application/json")
    error = assert_error(response, status, param)
    for piece in message:
        assert piece in error["message"], error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["error"] == {"object": "error", **{key: error[key] for key in ("message", "type", "param", "code")}}


def test_a_prompt_past_the_context_names_the_context_length(tiny_server):
    ids = list(range(1, 257))
    message = assert_error(send(tiny_server, "POST", "/v1/completions", {**COMPLETION, "prompt": ids}),
                           400, "prompt")["message"]
    assert "256 tokens" in message and "context length" in message


def test_a_prompt_that_fills_the_context_exactly_is_refused_and_one_less_is_served(tiny_server):
    message = assert_error(send(tiny_server, "POST", "/v1/completions",
                                {**COMPLETION, "prompt": [97] * 256}), 400, "prompt")["message"]
    assert "no room" in message
    reply = send(tiny_server, "POST", "/v1/completions", {**COMPLETION, "prompt": [97] * 255, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 1
    assert reply.json()["choices"][0]["finish_reason"] == "length"


def test_the_server_still_serves_after_the_errors(tiny_server):
    reply = send(tiny_server, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert httpx.get(tiny_server.base_url + "/health", timeout=30).json() == {"status": "ok"}


# ------------------------------------------------- values the engine cannot take


@pytest.mark.parametrize("top_k", [2**31, 10**20])
def test_a_huge_top_k_is_all_tokens_or_a_400(tiny_server, top_k):
    response = send(tiny_server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": 2, "top_k": top_k})
    if response.status_code != 200:
        assert_error(response, 400, "top_k")


def test_a_vanishing_repetition_penalty_is_served(tiny_server):
    """LMDeploy accepts any value > 0; one that underflows float32 is clamped, not a NaN."""
    response = send(tiny_server, "POST", "/v1/completions",
                    {**COMPLETION, "prompt": "The quick brown fox jumps over the lazy dog. " * 3,
                     "max_tokens": 4, "repetition_penalty": 1e-300, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_a_bad_request_does_not_fail_a_concurrent_one(tiny_server):
    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=60) as client:
            body = {**COMPLETION, "prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                events = []
                async for line in response.aiter_lines():
                    if line:
                        events.append(line)
                    if len(events) == 2:  # the innocent request is decoding: now the bad one
                        await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2, "top_k": 2**31})
            return events

    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in event for event in events), events[-2]
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
