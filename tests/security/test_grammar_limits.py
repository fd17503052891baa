"""Hostile response formats: the grammar engine's limits.

The reproduction: a 193-byte request with ``response_format: {"type": "regex_schema",
"regex_schema": "(b{1000}){1000}"}`` answered 500 ("too many expressions constructed"
and the grammar engine's internal state) after 1-2 s, and kept ~160 MB per distinct
pattern in the grammar cache (12 requests: RSS 1,078 -> 3,062 MB, for good).

Now such a format is a 400 naming the parameter that asked for it, the engine works
within limits (the lexer work and states one grammar may take), what a refused
grammar took is handed back, and the cache is bounded by bytes
(tests/core/test_output_grammar.py has its unit tests).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import post

from lmserve.core.structured_output import GrammarTooComplexError, OutputGrammar
from lmserve.core.types import InvalidRequestError
from lmserve.plugins import llguidance_grammar
from lmserve.plugins.llguidance_grammar import MAX_GRAMMAR_SOURCE_CHARS, LLGuidanceCompiler
from lmserve.plugins.tiny_model import write_tiny_model
from lmserve.plugins.tokenizer_files import tokenizer_from_path


def bomb(repeats: int = 1000) -> str:
    """``(b{1000}){repeats}``: 15 characters, a million ``b`` for the lexer."""
    return f"(b{{1000}}){{{repeats}}}"


def regex_format(pattern: str) -> dict:
    return {"type": "regex_schema", "regex_schema": pattern}


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 40, "temperature": 1.0}
#: What the engine's error looked like before: none of it may reach a client.
ENGINE_INTERNALS = ("<state>", "<grammar>", "Tokens:", "lexer_cost", "Parser:", "Stop:", "grammars", "\n")


@pytest.fixture(scope="module")
def server(lmserve_server_factory, tmp_path_factory):
    """The tiny model with room for tool definitions in its prompt; its own server,
    so that its memory is this module's alone."""
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-grammar-limits"), max_position_embeddings=2048)
    return lmserve_server_factory("--model-name", "tiny", model=directory)


def resident_mb(server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def refused(server, path: str, body: dict) -> dict:
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()


def assert_no_engine_internals(message: str) -> None:
    assert not [marker for marker in ENGINE_INTERNALS if marker in message], message
    assert len(message) < 300, message


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 40}),
])
def test_the_regex_bomb_is_a_quick_400_naming_response_format(server, path, body):
    started = time.monotonic()
    error = refused(server, path, {**body, "response_format": regex_format(bomb())})
    elapsed = time.monotonic() - started
    assert error["param"] == "response_format"
    assert error["message"].startswith("response_format: the regular expression is too large or complex "
                                       "for this server (limit: "), error
    assert_no_engine_internals(error["message"])
    assert elapsed < 2.0  # the acceptance bound; it took 1-2 s to fail as a 500 before


def test_twenty_distinct_bombs_leave_the_servers_memory_as_it_was(server):
    refused(server, "/v1/chat/completions", {**CHAT, "response_format": regex_format(bomb(1000))})  # warm up
    before = resident_mb(server)
    for repeats in range(999, 979, -1):  # distinct patterns: no cache could answer them
        error = refused(server, "/v1/chat/completions", {**CHAT, "response_format": regex_format(bomb(repeats))})
        assert error["param"] == "response_format"
    grown = resident_mb(server) - before
    assert grown < 50, f"RSS grew {grown:.0f} MB over 20 bombs"  # ~160 MB each before


def test_a_big_but_legitimate_schema_and_pattern_still_constrain_the_output(server):
    cities = [f"city {i}" for i in range(5000)]
    schema = {"type": "object", "properties": {"city": {"enum": cities}}, "required": ["city"],
              "additionalProperties": False}
    reply = post(server, "/v1/chat/completions", {**CHAT, "seed": 1, "response_format": {
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema}}})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].startswith('{"city": "city ')
    words = [f"word{i}" for i in range(10000)]  # a 10,000-word alternation: ~100 KB of pattern
    reply = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 40, "seed": 2,
                                             "response_format": regex_format("|".join(words))})
    assert reply["choices"][0]["text"] in set(words)


def test_a_forced_tool_calls_bomb_names_tools(server):
    tool = {"type": "function", "function": {"name": "spell", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "pattern": f"^{bomb()}$"}},
        "required": ["word"], "additionalProperties": False}}}
    body = {**CHAT, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "spell"}}}
    error = refused(server, "/v1/chat/completions", body)
    assert error["param"] == "tools"
    assert error["message"].startswith("tools: the schema is too large or complex for this server"), error
    assert_no_engine_internals(error["message"])


# ---------------------------------------------------------------- the compiler alone


@pytest.fixture(scope="module")
def compiler(tiny_model_dir):
    return LLGuidanceCompiler(tokenizer_from_path(tiny_model_dir))


@pytest.mark.parametrize("grammar", [
    OutputGrammar.regex(bomb()),
    OutputGrammar.regex("x" + bomb()),
    OutputGrammar.regex("[a-z]" + bomb()),
    OutputGrammar.regex("b{1000000}"),
    OutputGrammar.json_schema({"type": "string", "pattern": f"^{bomb()}$"}),
])
def test_formats_over_the_limits_are_refused_and_not_kept(compiler, grammar):
    with pytest.raises(GrammarTooComplexError) as info:
        compiler.constraint(grammar)
    assert info.value.param == "response_format" and "too large or complex" in info.value.message
    assert_no_engine_internals(info.value.message)
    assert not compiler.is_compiled(grammar)


def test_an_oversized_source_is_refused_before_the_engine_sees_it(compiler, monkeypatch):
    monkeypatch.setattr(llguidance_grammar, "_parser_limits", lambda: pytest.fail("the engine was reached"))
    with pytest.raises(GrammarTooComplexError) as info:
        compiler.constraint(OutputGrammar.regex("a" * (MAX_GRAMMAR_SOURCE_CHARS + 1)))
    assert f"{MAX_GRAMMAR_SOURCE_CHARS:,} characters" in info.value.message


def test_an_unexpected_engine_failure_is_still_the_formats_error_and_is_logged(compiler, monkeypatch, caplog):
    def explode():
        raise RuntimeError("panic in the engine\n<state>" + "x" * 5000)

    monkeypatch.setattr(llguidance_grammar, "_parser_limits", explode)
    with caplog.at_level(logging.WARNING, logger=llguidance_grammar.__name__), \
            pytest.raises(InvalidRequestError) as info:
        compiler.constraint(OutputGrammar.regex("abc"))
    assert info.value.param == "response_format"
    assert info.value.message == "response_format: this server could not compile the regular expression."
    logged = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(logged) == 1 and "RuntimeError: panic in the engine" in logged[0]
    assert len(logged[0]) < 1000  # the detail, cut short


def test_a_grammar_that_reaches_a_limit_while_generating_says_so_and_is_forgotten(compiler):
    """A pattern whose lexer blows up only after a few tokens passes the compile-time
    walk; the engine's constraint then refuses a token with the limit, in one sentence,
    and the compiler drops the broken grammar."""
    tokenizer = compiler._tokenizer
    grammar = OutputGrammar.regex("[a-z]{8}" + bomb())
    constraint = compiler.constraint(grammar)
    assert compiler.is_compiled(grammar)
    row = np.zeros((tokenizer.vocab_size + 31) // 32, np.int32)
    accepted = []
    for token in tokenizer.encode("abcdefgh" + "b" * 8, add_bos=False):  # as the engine does: mask, then accept
        constraint.fill_bitmask(row)
        accepted.append(constraint.accept(token))
    assert False in accepted
    assert constraint.error.startswith("the regular expression is too large or complex for this server (limit: ")
    assert_no_engine_internals(constraint.error)
    assert not compiler.is_compiled(grammar)
