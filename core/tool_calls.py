"""Reading tool calls out of a model's text: the parser interface and its choice.

A model asked to use tools writes its calls as text in the format it was
trained on (Hermes ``<tool_call>`` blocks, Llama 3.1 JSON, InternLM2 actions,
...). A :class:`ToolParser` reads one format. Parsers come from the
:hook:`lmserve_tool_parsers` hook; :func:`choose_tool_parser` picks one at
startup (``--tool-call-parser``, else the one whose format the chat template
shows), and the server makes a fresh instance per choice of each request.

A parser reads an output twice over, in one of two ways: :meth:`ToolParser.parse`
takes the whole text of a non-streamed answer; :meth:`ToolParser.feed` takes a
streamed answer's text as it comes and :meth:`ToolParser.flush` ends it. Both
are total: text that is not a well-formed call is content, never an exception.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

#: The parser used when none is named and none fits the chat template.
DEFAULT_TOOL_PARSER = "hermes"


def new_tool_call_id() -> str:
    """A fresh call id as OpenAI writes them: ``call_`` and 24 lowercase hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ParsedToolCall:
    """One call found in a whole output."""

    name: str
    #: The arguments object as JSON text.
    arguments: str
    id: str = field(default_factory=new_tool_call_id)


@dataclass(frozen=True)
class ParsedToolCallDelta:
    """A streamed piece of a call, as OpenAI streams them: the call's first piece
    carries its ``id`` and ``name`` (and maybe some arguments text), later ones
    only more arguments text. A call's pieces, joined, are its arguments' JSON."""

    #: The call's position among this output's calls: 0, 1, 2, ...
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ParsedOutput:
    """A whole output read: the text outside the calls, and the calls."""

    content: str
    tool_calls: tuple[ParsedToolCall, ...]


class ToolParser(ABC):
    """Reads the tool calls of one model output, in one format.

    One instance reads one output: the server calls :meth:`parse` once on a
    whole output, or :meth:`feed` with each new piece of a streamed one and
    :meth:`flush` when it ends. Built-ins take no constructor arguments; the
    server makes an instance with ``parser_class()``.
    """

    #: What ``--tool-call-parser`` calls it.
    name: ClassVar[str]
    #: Other names ``--tool-call-parser`` accepts.
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The format's markers are special tokens, which detokenizing would drop:
    #: outputs read by this parser are decoded with their special tokens.
    needs_special_tokens: ClassVar[bool] = False

    @classmethod
    def fits(cls, template_source: str) -> bool:
        """Whether a chat template writes tool calls in this format.

        Called once at startup when ``--tool-call-parser`` is not given.

        :param template_source: the template's source, then a conversation with a
            tool call rendered through it.
        """
        return False

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The calls of a whole output, and the text outside them, stripped of
        surrounding whitespace. An output with no call that parses is all content,
        unchanged; a malformed call is content too."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ParsedToolCallDelta]]:
        """Read the next piece of a streamed output.

        :return: the content that can be shown now (text that might still begin
            a call is held back), and the call pieces found.
        """

    @abstractmethod
    def flush(self) -> tuple[str, list[ParsedToolCallDelta]]:
        """End a streamed output: what was held back, as content or call pieces."""


def choose_tool_parser(parsers: Sequence[type[ToolParser]], name: str | None,
                       template_source: str) -> type[ToolParser] | None:
    """The parser for this server's outputs.

    :param parsers: the parsers of :hook:`lmserve_tool_parsers`, in hook order.
    :param name: ``--tool-call-parser``: a parser's name or alias, any case.
    :param template_source: what shows the chat template's tool format (see
        :meth:`ToolParser.fits`).
    :return: the parser named; without a name, the first that fits the template,
        else ``hermes``; None when there is neither.
    :raises ValueError: for a name no parser has; the message lists the names.
    """
    if name is not None:
        wanted = name.lower()
        for parser in parsers:
            if wanted in (known.lower() for known in (parser.name, *parser.aliases)):
                return parser
        raise ValueError(f"Unknown tool-call parser {name!r}; known: {_known_names(parsers)}.")
    for parser in parsers:
        if parser.fits(template_source):
            return parser
    return next((parser for parser in parsers if parser.name.lower() == DEFAULT_TOOL_PARSER), None)


def _known_names(parsers: Sequence[type[ToolParser]]) -> str:
    names = [f"{parser.name} ({', '.join(parser.aliases)})" if parser.aliases else parser.name
             for parser in parsers]
    return ", ".join(names) or "none (no plugin contributes a parser)"
