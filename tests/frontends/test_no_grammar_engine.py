"""A server without a grammar engine (its plugin withheld by
grammar_engine_withheld.py, as where llguidance is not installed) still serves
free text, and answers every request that needs a grammar (a response_format, a
forced tool call, in a stream or an interactive turn) with a 400 in OpenAI's error
shape that names the parameter and the missing engine: never a 500."""

import os
from pathlib import Path

import pytest

from conftest import post
from tiny_api import MESSAGES

from lmserve.plugins.tiny_model import write_tiny_model

JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": {"type": "object"}}}
TOOL = {"type": "function", "function": {"name": "roll", "parameters": {
    "type": "object", "properties": {"sides": {"type": "integer"}}, "required": ["sides"]}}}
CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 1}
NEEDS_A_GRAMMAR = [
    ("/v1/chat/completions", {**CHAT, "response_format": JSON_SCHEMA}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "stream": True}, "response_format"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 8,
                         "response_format": {"type": "regex_schema", "regex_schema": "[a-c]{3}"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "roll"}}}, "tools"),
    ("/v1/chat/interactive", {"prompt": "hi", "session_id": 77, "interactive_mode": True,
                              "request_output_len": 8, "response_format": JSON_SCHEMA}, "response_format"),
]


@pytest.fixture(scope="module")
def server(lmserve_server_factory, tmp_path_factory):
    """The tiny model (with room for a tool's instructions) and the withholding plugin,
    importable from this folder."""
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-no-grammar"), max_position_embeddings=2048)
    python_path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return lmserve_server_factory("--model-name", "tiny", "--plugin", "grammar_engine_withheld",
                                  model=directory, env={"PYTHONPATH": python_path})


@pytest.mark.parametrize("path, body, param", NEEDS_A_GRAMMAR,
                         ids=["json_schema", "json_object-stream", "completions-regex", "tool_choice-required",
                              "tool_choice-named", "interactive"])
def test_a_request_that_needs_a_grammar_is_a_400_naming_the_missing_engine(server, path, body, param):
    error = post(server, path, body, status=400)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["message"].startswith(f"{param}: this server has no grammar engine"), error


def test_the_server_says_at_startup_that_it_has_no_grammar_engine(server):
    assert "No plugin offers a grammar engine" in server.log()


def test_requests_that_need_no_grammar_are_served(server):
    for body in (CHAT, {**CHAT, "response_format": {"type": "text"}}, {**CHAT, "tools": [TOOL], "tool_choice": "auto"}):
        reply = post(server, "/v1/chat/completions", body)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
