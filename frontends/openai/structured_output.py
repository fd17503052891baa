"""A request's ``response_format`` (or forced tool call) as the grammar its output
must match, and the per-choice constraints compiled from it.

A new grammar is compiled off the event loop (:func:`compile_off_the_loop`, from
the routes, before the request's choices are built): a large schema may take a
while, and every stream would wait on it. Later constraints of the same grammar
come from the compiler's cache.
"""

from __future__ import annotations

import asyncio

from lmserve.core.structured_output import OutputGrammar, TokenConstraint
from lmserve.core.types import InvalidRequestError
from lmserve.frontends.openai.errors import APIError
from lmserve.frontends.openai.protocol import ResponseFormat
from lmserve.frontends.openai.state import ServerState
from lmserve.frontends.openai.tool_use import ToolUse


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
    """A fresh constraint for one choice; a 400 naming ``param`` for an invalid grammar."""
    try:
        return state.grammars.constraint(grammar)
    except InvalidRequestError as exc:
        raise APIError(400, exc.message.replace("response_format", param), param) from exc


async def compile_off_the_loop(state: ServerState, grammar: OutputGrammar | None, param: str) -> None:
    """Compile ``grammar`` into the server's cache in a worker thread, unless it is
    there already; a 400 naming ``param`` for an invalid grammar."""
    if grammar is not None and not state.grammars.is_compiled(grammar):
        await asyncio.to_thread(output_constraint, state, grammar, param)
