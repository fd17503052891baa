"""The OpenAI routes on a live server over a tiny random model."""


import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="unused")


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_streaming_has_usage(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_when_greedy(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0)
    assert whole.object == "text_completion"
    streamed = list(client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 6


def test_max_tokens_defaults_to_the_rest_of_the_context(client):
    """As LMDeploy: no max_tokens means all the room the context leaves (the tiny model's is 256)."""
    reply = client.completions.create(model="tiny", prompt="abc", temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 256
    assert reply.choices[0].finish_reason == "length"


def test_sse_ends_with_done(tiny_server):
    with httpx.stream(
        "POST", tiny_server.base_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def _post(server, path, body, **kwargs):
    return httpx.post(server.base_url + path, json=body, timeout=60, **kwargs)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    for where in (body["error"], body):
        assert set(("message", "type", "param", "code")) <= set(where)
        assert where["code"] == status and where["param"] == param and where["message"]
    assert body["object"] == "error"
    return body


def test_unknown_model_is_404(tiny_server):
    body = assert_error(_post(tiny_server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "model")
    assert body["message"] == "The model 'gpt-9' does not exist."


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"n": 0}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ],
)
def test_invalid_fields_are_400_with_param(tiny_server, body, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body}
    assert_error(_post(tiny_server, "/v1/chat/completions", request), 400, param)


def test_a_prompt_past_the_context_is_a_400_about_the_context_length(tiny_server):
    response = _post(tiny_server, "/v1/completions", {"model": "tiny", "prompt": list(range(300))})
    assert "context length" in assert_error(response, 400, "prompt")["message"]


def test_malformed_json_and_wrong_content_type_are_400(tiny_server):
    url = tiny_server.base_url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, content=b"model=tiny", headers={"content-type": "text/plain"}), 400)
    assert_error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)


def test_unknown_route_and_wrong_method_keep_the_error_shape(tiny_server):
    assert_error(httpx.get(tiny_server.base_url + "/v1/nothing"), 404)
    assert_error(httpx.get(tiny_server.base_url + "/v1/chat/completions"), 405)


def test_unknown_keys_are_ignored(tiny_server):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "kwargs": {"a": 1}, "top_k": 1}
    response = _post(tiny_server, "/v1/chat/completions", request)
    assert response.status_code == 200, response.text


def test_raw_string_messages_skip_the_template(tiny_server):
    request = {"model": "tiny", "messages": "abc", "max_tokens": 1, "temperature": 0}
    raw = _post(tiny_server, "/v1/chat/completions", request).json()
    templated = _post(tiny_server, "/v1/chat/completions", {**request, "messages": [{"role": "user", "content": "abc"}]}).json()
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]


def test_health(tiny_server):
    assert httpx.get(tiny_server.base_url + "/health").json() == {"status": "ok"}


def test_logit_bias_steers_every_token(tiny_server, tiny_model_dir):
    from lmserve.plugins.tokenizer_files import tokenizer_from_hf_dir

    tokenizer = tokenizer_from_hf_dir(tiny_model_dir)
    token = tokenizer.encode("a", add_bos=False)[0]
    body = {"model": "tiny", "prompt": "xyz", "max_tokens": 4, "temperature": 0.7, "seed": 3,
            "logit_bias": {str(token): 100}}
    reply = _post(tiny_server, "/v1/completions", body).json()
    assert reply["choices"][0]["text"] == "a" * 4


def test_cached_tokens_are_reported(tiny_server):
    reply = _post(tiny_server, "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 1}).json()
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_prefix_caching_reports_hits_and_changes_nothing(tiny_model_dir):
    from conftest import LiveServer

    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--enable-prefix-caching",
                        "--cache-block-seq-len", "16", "--cache-max-entry-count", "64")
    try:
        body = {"model": "tiny", "prompt": "the same long prefix " * 6, "max_tokens": 8, "temperature": 0}
        first = _post(server, "/v1/completions", body).json()
        second = _post(server, "/v1/completions", body).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % 16 == 0 and cached < second["usage"]["prompt_tokens"]
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        server.stop()
