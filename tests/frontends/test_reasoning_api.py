"""Reasoning apart from the answer, on a live tiny server whose template thinks.

The tiny model's template here is written after the DeepSeek-R1 distills': its
generation prompt opens ``<think>``, and it strips ``...</think>`` from earlier
replies, so the server picks the ``default`` parser by itself. Two ways make the
random model's text honest material for the split:

- unconstrained, its whole output is reasoning (the prompt opened it and the
  model never closes it); greedy, the same text comes back raw from
  ``/v1/completions`` on the same prompt, which stays unsplit;
- a regex response format makes it write ``<think>...</think>`` then an answer
  (an output held to a grammar starts outside the reasoning, so the tags it
  writes are what splits it), cut into tokens wherever the sampler put them.

Streamed and whole answers of the same seeded request must agree exactly.
"""

import json
import re
import subprocess

import httpx
import openai
import pytest

from conftest import LMSERVE, LiveServer, free_port, post, stream

from lmserve.frontends.http.responses import ChatCompletion, ChatCompletionChunk
from lmserve.frontends.interactive.protocol import InteractiveResponse
from lmserve.plugins.tiny_model import write_tiny_model

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}"
    "{% else %}{{ '<|Assistant|>' + message['content'].split('</think>')[-1] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"
)
PROMPT = "<|User|>hello there<|Assistant|><think>\n"  # what the template renders for MESSAGES
MESSAGES = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
THOUGHT_THEN_ANSWER = r"<think>[a-z ]{3,20}</think>[a-z ]{3,20}"
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
THOUGHT_THEN_CALL = (r'<think>[a-z ]{3,12}</think>\n<tool_call>\n\{"name": "get_time", "arguments": '
                     r'\{"zone": "(UTC|CET)"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-thinking"), max_position_embeddings=2048)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    server = LiveServer(directory, "--model-name", "tiny", log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def regex(pattern: str) -> dict:
    return {"type": "regex_schema", "regex_schema": pattern}


def joined(chunks: list[dict], key: str) -> str:
    return "".join(chunk["choices"][0]["delta"].get(key) or "" for chunk in chunks if chunk["choices"])


def test_the_server_picks_the_parser_the_template_writes_and_says_so(server):
    assert ("lmserve: reasoning parser 'default' (the chat template writes <think> and </think>): "
            "<think>...</think> goes to reasoning_content") in server.log()


def test_an_output_the_prompt_opened_and_never_closed_is_all_reasoning(server):
    raw = post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    reply = post(server, "/v1/chat/completions", CHAT)
    assert reply["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"]  # the same prompt, so the same text
    text = raw["choices"][0]["text"]
    assert text and "</think>" not in text
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == text and message["content"] is None
    usage = reply["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": usage["completion_tokens"]}
    assert "completion_tokens_details" not in raw["usage"]  # completions stay raw text


def test_streamed_reasoning_pieces_join_into_the_whole_answers_reasoning(server):
    whole = post(server, "/v1/chat/completions", CHAT)
    chunks = stream(server, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}})
    ChatCompletion.model_validate(whole)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert joined(chunks, "reasoning_content") == whole["choices"][0]["message"]["reasoning_content"]
    assert joined(chunks, "content") == ""
    assert all(isinstance(chunk["choices"][0]["delta"]["content"], str) for chunk in chunks if chunk["choices"])
    assert sum(1 for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("reasoning_content")) > 1
    assert chunks[-1]["usage"]["completion_tokens_details"] == whole["usage"]["completion_tokens_details"]


def test_thinking_then_an_answer_splits_at_the_close_tag_whole_and_streamed(server):
    body = {**CHAT, "max_tokens": 80, "temperature": 1.0, "seed": 7, "response_format": regex(THOUGHT_THEN_ANSWER)}
    reply = post(server, "/v1/chat/completions", body)
    message, usage = reply["choices"][0]["message"], reply["usage"]
    assert re.fullmatch(r"[a-z ]{3,20}", message["reasoning_content"]), message
    assert re.fullmatch(r"[a-z ]{3,20}", message["content"]), message
    reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning_tokens < usage["completion_tokens"]

    chunks = stream(server, "/v1/chat/completions", body)
    assert joined(chunks, "reasoning_content") == message["reasoning_content"]
    assert joined(chunks, "content") == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    ChatCompletion.model_validate(reply)  # the documented shapes (/openapi.json's)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)


def test_a_tool_call_after_the_thinking_is_a_call_and_the_thinking_is_reasoning(server):
    body = {**CHAT, "max_tokens": 120, "temperature": 1.0, "seed": 3, "tools": [TIME],
            "response_format": regex(THOUGHT_THEN_CALL)}
    reply = post(server, "/v1/chat/completions", body)["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    message = reply["message"]
    assert re.fullmatch(r"[a-z ]{3,12}", message["reasoning_content"]) and not message["content"]
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_time"
    arguments = json.loads(call["function"]["arguments"])

    chunks = stream(server, "/v1/chat/completions", body)
    assert joined(chunks, "reasoning_content") == message["reasoning_content"]
    deltas = [delta for chunk in chunks for delta in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert [delta["function"].get("name") for delta in deltas if "id" in delta] == ["get_time"]
    assert json.loads("".join(delta["function"]["arguments"] for delta in deltas)) == arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_openai_sdk_reads_reasoning_content_whole_and_streamed(server):
    body = {**CHAT, "max_tokens": 80, "temperature": 1.0, "seed": 11}
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client:
        completion = client.chat.completions.create(**body, extra_body={
            "response_format": regex(THOUGHT_THEN_ANSWER)})
        message = completion.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert re.fullmatch(r"[a-z ]{3,20}", reasoning) and re.fullmatch(r"[a-z ]{3,20}", message.content)
        assert completion.usage.completion_tokens_details.reasoning_tokens > 0
        pieces = {"reasoning_content": "", "content": ""}
        for chunk in client.chat.completions.create(**body, stream=True, extra_body={
                "response_format": regex(THOUGHT_THEN_ANSWER)}):
            delta = chunk.choices[0].delta
            pieces["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
            pieces["content"] += delta.content or ""
    assert pieces == {"reasoning_content": reasoning, "content": message.content}


def test_the_interactive_reply_and_its_lines_carry_the_reasoning_apart(server):
    raw = post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    body = {"prompt": "hello there", "session_id": -1, "request_output_len": 12, "temperature": 0, "top_k": 1}
    reply = post(server, "/v1/chat/interactive", body)
    assert (reply["reasoning_content"], reply["text"]) == (raw["choices"][0]["text"], "")
    with httpx.stream("POST", server.base_url + "/v1/chat/interactive", json={**body, "stream": True},
                      timeout=60) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line["reasoning_content"] for line in lines) == reply["reasoning_content"]
    assert "".join(line["text"] for line in lines) == ""
    assert lines[-1]["finish_reason"] == reply["finish_reason"] and lines[-1]["tokens"] == reply["tokens"]
    for line in [reply, *lines]:
        InteractiveResponse.model_validate(line)


def test_a_server_without_a_reasoning_parser_answers_as_before(tiny_server):
    reply = post(tiny_server, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "<think>x</think>"}]})
    assert "reasoning_content" not in reply["choices"][0]["message"]
    assert "completion_tokens_details" not in reply["usage"]
    interactive = post(tiny_server, "/v1/chat/interactive", {"prompt": "hi", "request_output_len": 4})
    assert "reasoning_content" not in interactive


def test_an_unknown_reasoning_parser_stops_the_server_with_the_known_names(tiny_model_dir):
    result = subprocess.run(
        [*LMSERVE, "serve", "api_server", str(tiny_model_dir), "--server-port", str(free_port()),
         "--reasoning-parser", "nonsense"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Unknown reasoning parser 'nonsense'; known: default (" in result.stderr
    assert "qwen-qwq" in result.stderr and "none." in result.stderr
    assert "Loading weights" not in result.stderr  # refused before any weight loads
