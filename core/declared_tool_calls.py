"""Tool calls only to the functions a request declared.

A model can be talked into writing a call to any name: a user message that asks
it to repeat ``<tool_call>{"name": "delete_all_files", ...}</tool_call>`` gets a
well-formed call. A client that runs whatever ``tool_calls`` names would then run
a function it never offered. :class:`DeclaredToolCalls` wraps the server's parser
(``tool_choice: auto``; ``required`` and a named function are constrained to the
declared names by their grammar) so that a call to an undeclared function is
never a call:

- when the output's first call names an undeclared function, the whole output
  is content, exactly as the model wrote it (the client sees what the model said,
  and nothing runs); later calls in it are text too;
- an undeclared call after a declared one is dropped, with its text; the declared
  calls stay, numbered 0, 1, ... without gaps.

Streamed and whole outputs are read alike. Dropped calls are logged (their name only).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from lmserve.core.tool_calls import ParsedOutput, ParsedToolCallDelta, ToolParser

logger = logging.getLogger(__name__)


class DeclaredToolCalls(ToolParser):
    """``parser``'s reading of one output, keeping only calls to ``declared`` functions."""

    name = "declared-calls"

    def __init__(self, parser: ToolParser, declared: Collection[str]):
        self._parser = parser
        self._declared = frozenset(declared)
        self._raw: list[str] = []  # the streamed text so far, while no call was kept
        self._shown = 0  # the length of the content given out before the first call
        self._as_text = False  # the first call was undeclared: the rest is content as it comes
        self._kept: dict[int, int] = {}  # the parser's index of a kept call -> the index given out
        self._dropped: set[int] = set()

    def parse(self, text: str) -> ParsedOutput:
        parsed = self._parser.parse(text)
        if not parsed.tool_calls:
            return parsed
        if parsed.tool_calls[0].name not in self._declared:
            _log_undeclared(parsed.tool_calls[0].name, "the output is returned as content")
            return ParsedOutput(text, ())
        for call in parsed.tool_calls:
            if call.name not in self._declared:
                _log_undeclared(call.name, "the call is dropped")
        return ParsedOutput(parsed.content, tuple(call for call in parsed.tool_calls if call.name in self._declared))

    def feed(self, text: str) -> tuple[str, list[ParsedToolCallDelta]]:
        if self._as_text:
            return text, []
        if not self._kept:
            self._raw.append(text)
        return self._filter(*self._parser.feed(text))

    def flush(self) -> tuple[str, list[ParsedToolCallDelta]]:
        if self._as_text:
            return "", []
        return self._filter(*self._parser.flush())

    def _filter(self, content: str, deltas: list[ParsedToolCallDelta]) -> tuple[str, list[ParsedToolCallDelta]]:
        kept: list[ParsedToolCallDelta] = []
        for delta in deltas:
            if delta.index in self._kept:
                kept.append(_renumbered(delta, self._kept[delta.index]))
            elif delta.index in self._dropped:
                continue
            elif delta.name in self._declared:  # a new call's first piece
                self._kept[delta.index] = len(self._kept)
                self._raw = []
                kept.append(_renumbered(delta, self._kept[delta.index]))
            elif not self._kept:  # the first call is undeclared: the output is text
                # Everything not given out before this piece, the call included (this
                # piece's content may hold text from both sides of the call).
                raw = "".join(self._raw)
                self._as_text, self._raw = True, []
                _log_undeclared(delta.name, "the output is returned as content")
                return raw[self._shown:], []
            else:
                self._dropped.add(delta.index)
                _log_undeclared(delta.name, "the call is dropped")
        if not self._kept:
            self._shown += len(content)
        return content, kept


def _renumbered(delta: ParsedToolCallDelta, index: int) -> ParsedToolCallDelta:
    if delta.index == index:
        return delta
    return ParsedToolCallDelta(index, delta.id, delta.name, delta.arguments)


def _log_undeclared(name: str | None, outcome: str) -> None:
    logger.info("A tool call named %r, a function the request did not declare: %s.", (name or "")[:64], outcome)
