"""A request's ``response_format`` (or forced tool call) as the grammar its output
must match, and the per-choice constraints compiled from it.

A new grammar is compiled off the event loop (:func:`compile_off_the_loop`, from
the routes, before the request's choices are built): a large schema may take a
while, and every stream would wait on it. Later constraints of the same grammar
come from the compiler's cache.

The grammar engine is a plugin (:hook:`lmserve_grammar_compiler`; the built-in one
is ``lmserve.plugins.llguidance_grammar``). A grammar over its limits (lexer work and
states, grammar size, source length) is a 400 naming the parameter that asked for
it, ``response_format`` or ``tools``, with the limit it reached; so is any grammar
on a server that has no grammar engine.
"""

from __future__ import annotations

import asyncio
import logging

from lmserve.core.structured_output import LOGGED_ERROR_CHARS, NO_GRAMMAR_ENGINE, OutputGrammar, TokenConstraint
from lmserve.core.types import InvalidRequestError
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.protocol import ResponseFormat
from lmserve.frontends.http.state import ServerState
from lmserve.frontends.http.tool_use import ToolUse

logger = logging.getLogger(__name__)


def output_grammar(response_format: ResponseFormat | None) -> OutputGrammar | None:
    """None for free text; OpenAI's ``json_object`` and ``json_schema`` and LMDeploy's
    ``regex_schema`` otherwise (a JSON schema given without ``schema`` allows any JSON value)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputGrammar.json_object()
    if response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema
        return OutputGrammar.json_schema(True if schema is None else schema)
    return OutputGrammar.regex(response_format.regex_schema)


def request_grammar(response_format: ResponseFormat | None,
                    tools: ToolUse | None = None) -> tuple[OutputGrammar | None, str]:
    """The grammar of a request's output and the parameter that asked for it: a forced
    tool call's (``tools``), else the ``response_format``'s."""
    if tools is not None and tools.grammar is not None:
        return tools.grammar, "tools"
    return output_grammar(response_format), "response_format"


def output_constraint(state: ServerState, grammar: OutputGrammar, param: str) -> TokenConstraint:
    """A fresh constraint for one choice; a 400 naming ``param`` for a grammar that
    is invalid or over the grammar engine's limits, and for anything else compiling
    it raised (the client's grammar is all that varies: it is never a 500), and on a
    server without a grammar engine."""
    if state.grammars is None:
        raise APIError(400, f"{param}: {NO_GRAMMAR_ENGINE}.", param)
    try:
        return state.grammars.constraint(grammar)
    except InvalidRequestError as exc:
        message = exc.message
        if message.startswith("response_format"):
            message = param + message.removeprefix("response_format")
        raise APIError(400, message, param) from exc
    except Exception as exc:
        logger.warning("Compiling a %s grammar for %s failed: %s: %s", grammar.kind, param, type(exc).__name__,
                       str(exc)[:LOGGED_ERROR_CHARS])
        raise APIError(400, f"{param}: this server could not compile the grammar.", param) from None


async def compile_off_the_loop(state: ServerState, grammar: OutputGrammar | None, param: str) -> None:
    """Compile ``grammar`` into the server's cache in a worker thread, unless it is
    there already; a 400 naming ``param`` for an invalid grammar (or where the server
    has no grammar engine)."""
    if grammar is None:
        return
    if state.grammars is None or not state.grammars.is_compiled(grammar):
        await asyncio.to_thread(output_constraint, state, grammar, param)
