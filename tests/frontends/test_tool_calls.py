"""Tool calls on the live tiny server: tool_choice required and a named function
(constrained, so even the random model calls validly), auto (a regex response
format makes the model write a Hermes call, which the server's parser reads),
none; streamed deltas; tool conversations in the history; bad tool requests."""

import json
import subprocess

import httpx
import jsonschema
import pytest

from conftest import LMSERVE, LiveServer, free_port, post, stream
from tiny_api import MESSAGES

from lmserve.plugins.tiny_model import write_tiny_model

TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
DICE = {"type": "function", "function": {
    "name": "roll", "parameters": {"type": "object", "properties": {"sides": {"type": "integer", "minimum": 2,
                                                                                 "maximum": 20}},
                                   "required": ["sides"], "additionalProperties": False}}}
TOOLS = [TIME, DICE]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 80, "temperature": 1.0, "tools": TOOLS}
HERMES_CALL = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    """The tiny model with room for the tools' instructions (its template renders no
    tools, so they go in as Hermes text: a few hundred byte-level tokens)."""
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-tools"), max_position_embeddings=2048)
    server = LiveServer(directory, "--model-name", "tiny")
    yield server
    server.stop()


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]]


def streamed_calls(chunks: list[dict]) -> tuple[dict[int, dict], list[str | None]]:
    """Each call's pieces put together, and the finish reasons."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for call in chunk["choices"][0]["delta"].get("tool_calls") or []:
            entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": "", "names_sent": 0})
            if "id" in call:
                entry["id"] = call["id"]
            if "name" in call["function"]:
                entry["name"] += call["function"]["name"]
                entry["names_sent"] += 1
            entry["arguments"] += call["function"]["arguments"]
    return calls, [chunk["choices"][0]["finish_reason"] for chunk in chunks]


@pytest.mark.parametrize("seed", range(4))
def test_required_returns_valid_calls(tools_server, seed):
    # a random model adds calls at random: room for several
    reply = post(tools_server, "/v1/chat/completions",
                 {**CHAT, "tool_choice": "required", "seed": seed, "max_tokens": 600})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = calls_of(choice["message"])
    assert calls  # parallel_tool_calls (true by default) allows several
    for name, arguments in calls:
        jsonschema.validate(arguments, PARAMETERS[name])
    assert all(call["id"].startswith("call_") and call["type"] == "function"
               for call in choice["message"]["tool_calls"])


def test_required_without_parallel_calls_makes_exactly_one(tools_server):
    for seed in range(3):
        reply = post(tools_server, "/v1/chat/completions",
                     {**CHAT, "tool_choice": "required", "parallel_tool_calls": False, "seed": seed})
        assert len(reply["choices"][0]["message"]["tool_calls"]) == 1


def test_a_named_function_is_the_call_streamed_and_not(tools_server):
    body = {**CHAT, "tool_choice": {"type": "function", "function": {"name": "roll"}}, "seed": 7}
    reply = post(tools_server, "/v1/chat/completions", body)["choices"][0]
    [(name, arguments)] = calls_of(reply["message"])
    assert name == "roll" and 2 <= arguments["sides"] <= 20 and reply["finish_reason"] == "tool_calls"
    calls, finishes = streamed_calls(stream(tools_server, "/v1/chat/completions", body))
    assert list(calls) == [0] and calls[0]["name"] == "roll" and calls[0]["names_sent"] == 1
    assert json.loads(calls[0]["arguments"]) == arguments and calls[0]["id"].startswith("call_")
    assert finishes[-1] == "tool_calls" and finishes[:-1] == [None] * (len(finishes) - 1)


def test_required_streams_name_once_and_arguments_in_pieces(tools_server):
    body = {**CHAT, "tool_choice": "required", "seed": 3}
    expected = calls_of(post(tools_server, "/v1/chat/completions", body)["choices"][0]["message"])
    calls, finishes = streamed_calls(stream(tools_server, "/v1/chat/completions", body))
    assert [(call["name"], json.loads(call["arguments"])) for call in calls.values()] == expected
    assert all(call["names_sent"] == 1 for call in calls.values())
    assert finishes[-1] == "tool_calls"


def test_auto_reads_a_hermes_call_out_of_the_text(tools_server):
    # The regex makes the random model write a Hermes call; the server's parser (hermes:
    # the tiny model's template has no tool format of its own) turns it into a call.
    body = {**CHAT, "tool_choice": "auto", "seed": 1, "response_format": {"type": "regex_schema",
                                                                          "regex_schema": HERMES_CALL}}
    reply = post(tools_server, "/v1/chat/completions", body)["choices"][0]
    assert reply["finish_reason"] == "tool_calls" and not reply["message"]["content"]
    [(name, arguments)] = calls_of(reply["message"])
    assert name == "get_time" and arguments["zone"] in ("UTC", "CET")
    calls, finishes = streamed_calls(stream(tools_server, "/v1/chat/completions", body))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(name, arguments)]
    assert finishes[-1] == "tool_calls"


def test_auto_without_a_call_is_plain_text(tools_server):
    reply = post(tools_server, "/v1/chat/completions", {**CHAT, "seed": 2, "max_tokens": 8})["choices"][0]
    assert "tool_calls" not in reply["message"] and reply["finish_reason"] in ("stop", "length")
    assert isinstance(reply["message"]["content"], str)


def test_none_renders_the_tools_and_parses_nothing(tools_server):
    body = {**CHAT, "tool_choice": "none", "seed": 1, "response_format": {"type": "regex_schema",
                                                                          "regex_schema": HERMES_CALL}}
    reply = post(tools_server, "/v1/chat/completions", body)["choices"][0]
    assert "tool_calls" not in reply["message"] and reply["message"]["content"].startswith("<tool_call>")
    with_tools = post(tools_server, "/tokenize", {"messages": MESSAGES})["count"]
    assert post(tools_server, "/v1/chat/completions", body)["usage"]["prompt_tokens"] > with_tools


def test_a_tool_conversation_renders_into_the_next_prompt(tools_server):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    reply = post(tools_server, "/v1/chat/completions", {**CHAT, "messages": history, "max_tokens": 4})
    short = post(tools_server, "/v1/chat/completions", {**CHAT, "max_tokens": 4})
    assert reply["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"] + 10  # the call and its result


@pytest.mark.parametrize("change, param", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [TIME, TIME]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "get_time", "arguments": "{oops"}}]}]},
     "messages"),
])
def test_bad_tool_requests_are_400s_naming_the_field(tools_server, change, param):
    body = {key: value for key, value in {**CHAT, **change}.items() if value is not None}
    response = httpx.post(tools_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["param"].split(".")[0] == param, response.json()


def test_an_unknown_tool_call_parser_stops_the_server_with_one_line(tiny_model_dir):
    result = subprocess.run(
        [*LMSERVE, "serve", "api_server", str(tiny_model_dir), "--server-port", str(free_port()),
         "--tool-call-parser", "nope"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Unknown tool-call parser 'nope'" in result.stderr and "hermes (qwen" in result.stderr
    assert "Loading weights" not in result.stderr  # refused before any weight loads
