"""A chat request's ``tools`` and ``tool_choice``: what the chat template sees,
what constrains the output, and how each choice's text is read back as calls.

- ``auto`` (the default with tools): the template renders the tools, the model
  answers as it was trained to, and the server's tool parser
  (``--tool-call-parser``, else the one that fits the template) finds the calls;
  only calls to declared functions are calls (:mod:`~lmserve.core.declared_tool_calls`).
- ``required``: the output is constrained to a JSON array of calls
  ``[{"name": ..., "parameters": {...}}]`` (one call unless
  ``parallel_tool_calls``), each call's parameters valid against its tool's
  schema; the ``json`` parser reads it. Even a small model returns a valid call.
- a named function: the output is constrained to that function's arguments object.
- ``none``: the tools are rendered, nothing is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from lmserve.core.declared_tool_calls import DeclaredToolCalls
from lmserve.core.structured_output import OutputGrammar
from lmserve.core.tool_calls import ParsedOutput, ParsedToolCall, ParsedToolCallDelta, ToolParser, new_tool_call_id
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.protocol import ChatCompletionRequest, NamedToolChoice, Tool

#: A function that declares no parameters takes an empty object.
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools mean for generating and answering it."""

    #: OpenAI's tool list for the chat template; None: the request has no tools.
    template_tools: list[dict] | None = None
    #: The output's grammar (``required`` or a named function).
    grammar: OutputGrammar | None = None
    #: Makes each choice's parser; None: the output is plain text.
    new_parser: Callable[[], ToolParser] | None = None
    #: The parser's markers are special tokens: decode them.
    needs_special_tokens: bool = False


def tool_use(body: ChatCompletionRequest, default_parser: type[ToolParser] | None,
             json_parser: type[ToolParser] | None) -> ToolUse:
    """The request's :class:`ToolUse`; :class:`APIError` 400 for tools that cannot be used.

    ``default_parser`` reads ``auto`` outputs; ``json_parser`` reads ``required`` ones."""
    tools, choice = body.tools or [], body.tool_choice
    if not tools:
        if choice in (None, "none"):
            return ToolUse()
        raise APIError(400, "tool_choice needs tools: the request has none.", "tool_choice")
    names = [tool.function.name for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise APIError(400, f"tools: the function name {repeated[0]!r} is used twice.", "tools")
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "none":
        return ToolUse(template_tools)
    constrained = choice == "required" or isinstance(choice, NamedToolChoice)
    if constrained and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tool_choice 'required' or a named "
                       "function: the tool call is the format.", "response_format")
    if choice == "required":
        if json_parser is None:
            raise APIError(400, "This server has no parser for required tool calls.", "tool_choice")
        schema = calls_schema(tools, parallel=body.parallel_tool_calls)
        return ToolUse(template_tools, OutputGrammar.json_schema(schema), json_parser)
    if isinstance(choice, NamedToolChoice):
        tool = next((tool for tool in tools if tool.function.name == choice.function.name), None)
        if tool is None:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                           f"tools ({', '.join(names)}).", "tool_choice")
        name = tool.function.name
        return ToolUse(template_tools, OutputGrammar.json_schema(_parameters(tool)),
                       lambda: NamedFunctionParser(name))
    if default_parser is None:
        raise APIError(400, "This server has no tool-call parser.", "tools")
    return ToolUse(template_tools, None, lambda: DeclaredToolCalls(default_parser(), names),
                   default_parser.needs_special_tokens)


def calls_schema(tools: list[Tool], *, parallel: bool) -> dict:
    """A JSON array of calls to ``tools``, each ``{"name", "parameters"}`` valid
    against its tool; at least one, at most one unless ``parallel``."""
    calls = [{"type": "object",
              "properties": {"name": {"const": tool.function.name}, "parameters": _parameters(tool)},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


class NamedFunctionParser(ToolParser):
    """Reads an output constrained to one function's arguments object as that function's call."""

    name: ClassVar[str] = "named-function"

    def __init__(self, function_name: str):
        self.function_name = function_name
        self._id = new_tool_call_id()
        self._started = False
        self._text: list[str] = []

    @classmethod
    def fits(cls, template_source: str) -> bool:
        return False

    def parse(self, text: str) -> ParsedOutput:
        try:
            arguments = json.loads(text)
        except ValueError:
            return ParsedOutput(text, ())
        call = ParsedToolCall(self.function_name, json.dumps(arguments, ensure_ascii=False), self._id)
        return ParsedOutput("", (call,))

    def feed(self, text: str) -> tuple[str, list[ParsedToolCallDelta]]:
        if not text:
            return "", []
        first = not self._started
        self._started = True
        if first:
            return "", [ParsedToolCallDelta(0, self._id, self.function_name, text)]
        return "", [ParsedToolCallDelta(0, arguments=text)]

    def flush(self) -> tuple[str, list[ParsedToolCallDelta]]:
        return "", []
