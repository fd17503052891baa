"""Tool calls written as JSON objects in a frame of markers: the reading machine.

Many models write a call as a JSON object ``{"name": ..., "arguments": {...}}``
(``"parameters"`` is read alike) and differ only in what frames it: markers that
open and close a run of calls, a separator between calls. :class:`JsonCallParser`
reads any such format; a subclass (the built-ins in
``lmserve.plugins.tool_parsers``, or a plugin's) names its markers.

One machine (:class:`_CallStream`) reads both ways, so a streamed output and the
same output read whole agree. Streamed, content goes out as soon as it cannot
begin a marker, a call's first delta (id and name) as soon as its name is read,
then its arguments' raw JSON as it arrives: a call counts from its name on.
Read whole, a call counts only once its object is complete and valid JSON;
anything else is content, unchanged. Beneath it, :class:`JsonValueScanner` finds
where a JSON value ends in text that arrives in pieces, and
:class:`CallObjectReader` reads a call object's name and arguments from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import ClassVar

from lmserve.core.tool_calls import ParsedOutput, ParsedToolCall, ParsedToolCallDelta, ToolParser, new_tool_call_id

_WHITESPACE = " \t\r\n"
_STRING_SPECIAL = re.compile(r'["\\]')
_STRUCTURE_SPECIAL = re.compile(r'["\[\]{}]')
_SCALAR_END = re.compile(r"[\s,\]}]")


class JsonValueScanner:
    """Finds where one JSON value ends, in text that arrives in pieces.

    Tracks only what decides the end: bracket depth, and whether it is inside a
    string or just after a backslash in one. It checks nothing else; ``json.loads``
    does, once the value has ended.
    """

    def __init__(self) -> None:
        self._kind: str | None = None  # "container", "string" or "scalar": set by the first character
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str, start: int = 0) -> int | None:
        """Read ``text[start:]``, the value's next piece (its first piece starts at
        the value's first character): the index just past the value's end, or None
        when it goes on. A number or literal ends before the delimiter after it."""
        i = start
        while i < len(text):
            if self._in_string:
                if self._escaped:
                    self._escaped, i = False, i + 1
                    continue
                match = _STRING_SPECIAL.search(text, i)
                if match is None:
                    return None
                i = match.end()
                if match.group() == "\\":
                    self._escaped = True
                    continue
                self._in_string = False
                if self._depth == 0:
                    return i
            elif self._kind is None:
                char, i = text[i], i + 1
                if char in "{[":
                    self._kind, self._depth = "container", 1
                elif char == '"':
                    self._kind, self._in_string = "string", True
                else:
                    self._kind = "scalar"
            elif self._kind == "scalar":
                match = _SCALAR_END.search(text, i)
                return None if match is None else match.start()
            else:
                match = _STRUCTURE_SPECIAL.search(text, i)
                if match is None:
                    return None
                i, char = match.end(), match.group()
                if char == '"':
                    self._in_string = True
                elif char in "{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        return i
        return None


# What each punctuation does in the call object, by state: the next state.
_KEY, _DONE = "<key>", "<done>"
_TRANSITIONS = {
    ("open", "{"): "key_or_close",
    ("key_or_close", '"'): _KEY,
    ("key_or_close", "}"): _DONE,
    ("key", '"'): _KEY,
    ("colon", ":"): "value",
    ("comma_or_close", ","): "key",
    ("comma_or_close", "}"): _DONE,
}


class CallObjectReader:
    """Reads one call object, ``{"name": "...", "arguments": {...}}``, as it arrives.

    After each :meth:`read`: :attr:`name` once the name is read; the arguments'
    raw JSON text read so far from :meth:`take_arguments`; :attr:`done` once the
    closing brace is read; :attr:`failed` when the text is not such an object.
    Keys and values are checked with ``json.loads`` as each ends; other keys'
    values are skipped.
    """

    def __init__(self, argument_keys: tuple[str, ...]):
        self.argument_keys = argument_keys
        self.name: str | None = None
        #: The arguments object, once read whole.
        self.arguments: dict | None = None
        #: An arguments object began.
        self.has_arguments = False
        self.done = False
        self.failed = False
        self._state = "open"
        self._key: str | None = None
        self._target = ""  # what the scanner reads: "key", "name", "arguments" or "skip"
        self._scanner: JsonValueScanner | None = None
        self._value: list[str] = []  # the key or value being scanned
        self._arguments: list[str] = []
        self._taken = 0

    def read(self, text: str, pos: int) -> int:
        """Read on from ``text[pos:]``; return where reading stopped: ``len(text)``
        when the object goes on, just past it when done, at the offending
        character (or just past the offending value) when failed."""
        while pos < len(text) and not (self.done or self.failed):
            if self._scanner is not None:
                pos = self._scan(text, pos)
                continue
            char = text[pos]
            if char in _WHITESPACE:
                pos += 1
            elif self._state == "value":
                self._begin_value(char)
            else:
                following = _TRANSITIONS.get((self._state, char))
                if following is None:
                    self.failed = True
                elif following == _KEY:
                    self._target, self._scanner = "key", JsonValueScanner()
                elif following == _DONE:
                    self.done, pos = True, pos + 1
                else:
                    self._state, pos = following, pos + 1
        return pos

    def take_arguments(self) -> str:
        """The arguments text read since the last take."""
        pieces, self._taken = self._arguments[self._taken:], len(self._arguments)
        return "".join(pieces)

    def _begin_value(self, char: str) -> None:
        if self._key == "name" and self.name is None:
            target = "name" if char == '"' else None
        elif self._key in self.argument_keys and not self.has_arguments:
            target, self.has_arguments = ("arguments" if char == "{" else None), True
        else:
            target = None if char in ",:]}" else "skip"
        if target is None:
            self.failed = True
        else:
            self._target, self._scanner = target, JsonValueScanner()

    def _scan(self, text: str, pos: int) -> int:
        end = self._scanner.scan(text, pos)
        piece = text[pos:] if end is None else text[pos:end]
        (self._arguments if self._target == "arguments" else self._value).append(piece)
        if end is None:
            return len(text)
        self._scanner = None
        raw = "".join(self._arguments if self._target == "arguments" else self._value)
        self._value = []
        try:
            value = json.loads(raw)
        except ValueError:
            self.failed = True
            return end
        if self._target == "key":
            self._key, self._state = value, "colon"
            return end
        if self._target == "name":
            self.name = value
        elif self._target == "arguments":
            self.arguments = value
        self._state = "comma_or_close"
        return end


class JsonCallParser(ToolParser):
    """Calls written as JSON objects ``{"name", "arguments"}`` in a frame of markers.

    A run of calls opens with one of :attr:`start_markers` anywhere in the
    text, or with :attr:`leading_marker` at the output's start; its calls are
    separated by :attr:`separator` and it closes with :attr:`end_marker`
    (without one, with the first text that is not a separator). Whitespace
    around calls is not content.
    """

    #: Open a run of calls anywhere in the text.
    start_markers: ClassVar[tuple[str, ...]] = ()
    #: Opens a run only at the output's start, after whitespace; ``""``: a bare object there.
    leading_marker: ClassVar[str | None] = None
    #: Separates the calls of one run; None: one call per run.
    separator: ClassVar[str | None] = None
    #: Closes a run; None: what is not a separator closes it.
    end_marker: ClassVar[str | None] = None
    #: The keys that may hold the arguments object.
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self) -> None:
        self._stream = _CallStream(self, streaming=True)

    def parse(self, text: str) -> ParsedOutput:
        whole = _CallStream(self, streaming=False)
        whole.feed(text)
        whole.flush()
        if not whole.calls:
            return ParsedOutput(text, ())
        return ParsedOutput("".join(whole.content).strip(), tuple(whole.calls))

    def feed(self, text: str) -> tuple[str, list[ParsedToolCallDelta]]:
        self._stream.feed(text)
        return self._stream.take()

    def flush(self) -> tuple[str, list[ParsedToolCallDelta]]:
        self._stream.flush()
        return self._stream.take()


class _CallStream:
    """The text of one output, read in pieces: its content, and its calls as
    deltas (``streaming``) or as whole :class:`ParsedToolCall` objects.

    States: ``leading`` (the output's start), ``content``, then in a run of
    calls ``before_object``, ``object`` and ``after_object``. The buffer holds
    the text from ``mark`` on: everything before it is given out (as content or
    a call) or dropped; a run that turns out not to be calls gives out the text
    from ``mark`` as content.
    """

    def __init__(self, parser: JsonCallParser, *, streaming: bool):
        self._format = parser
        self._streaming = streaming
        self.content: list[str] = []
        self.deltas: list[ParsedToolCallDelta] = []
        self.calls: list[ParsedToolCall] = []
        self._buffer = ""
        self._pos = 0
        self._mark = 0
        self._state = "leading" if parser.leading_marker is not None else "content"
        self._after_call = False  # whitespace now is a gap between calls, or their tail
        self._reader: CallObjectReader | None = None
        self._index = 0  # the next call's
        self._call_id: str | None = None  # the streamed call whose name is out

    def feed(self, text: str) -> None:
        self._buffer += text
        steps = {"leading": self._leading, "content": self._content, "before_object": self._before_object,
                 "object": self._object, "after_object": self._after_object}
        while steps[self._state]():
            pass
        self._buffer, self._pos, self._mark = self._buffer[self._mark:], self._pos - self._mark, 0

    def flush(self) -> None:
        rest = self._buffer[self._mark:]
        if self._state in ("leading", "content"):
            if not (self._after_call and not rest.strip()):
                self._give_content(rest)
        elif self._state in ("before_object", "object") and self._call_id is None:
            if not self._index or rest.strip() != self._format.separator:
                self._give_content(rest)  # a call that never got its name: it was text
        elif self._state == "object":  # a streamed call cut short
            if not self._reader.has_arguments:
                self._add_delta(ParsedToolCallDelta(self._index, arguments="{}"))
            self._close_call()
        # after_object: whitespace or part of an end marker, dropped
        self._buffer, self._pos, self._mark, self._state = "", 0, 0, "content"

    def take(self) -> tuple[str, list[ParsedToolCallDelta]]:
        content, deltas = "".join(self.content), self.deltas
        self.content, self.deltas = [], []
        return content, deltas

    # ------------------------------------------------------------ states: each returns
    # True when it moved on, False when it needs more text.

    def _leading(self) -> bool:
        buffer, marker = self._buffer, self._format.leading_marker
        start = _skip_whitespace(buffer, self._pos)
        if start == len(buffer):
            return False
        if buffer.startswith(marker, start):
            self._pos, self._state = start + len(marker), "before_object"
            return True
        if marker.startswith(buffer[start:]):
            return False
        self._state = "content"
        return True

    def _content(self) -> bool:
        buffer, pos, markers = self._buffer, self._pos, self._format.start_markers
        if self._after_call:
            start = _skip_whitespace(buffer, pos)
            if start == len(buffer) or _could_begin(buffer[start:], markers):
                return False
            self._after_call = False
            if any(buffer.startswith(marker, start) for marker in markers):
                self._pos = self._mark = start  # the gap before the next call: dropped
            return True
        found = [(index, marker) for marker in markers if (index := buffer.find(marker, pos)) >= 0]
        if found:
            start, marker = min(found)
            self._give_content(buffer[pos:start])
            self._mark, self._pos, self._state = start, start + len(marker), "before_object"
            return True
        held = _held_suffix(buffer, pos, markers)
        self._give_content(buffer[pos:held])
        self._pos = self._mark = held
        return False

    def _before_object(self) -> bool:
        start = _skip_whitespace(self._buffer, self._pos)
        self._pos = start
        if start == len(self._buffer):
            return False
        if self._buffer[start] != "{":
            self._fail()
        else:
            self._reader, self._state = CallObjectReader(self._format.argument_keys), "object"
        return True

    def _object(self) -> bool:
        reader = self._reader
        self._pos = reader.read(self._buffer, self._pos)
        if self._streaming and reader.name is not None:
            self._stream_call(reader)
        if reader.failed or (reader.done and reader.name is None):
            self._fail()
        elif reader.done:
            self._end_call(reader)
        return reader.failed or reader.done

    def _after_object(self) -> bool:
        buffer, end, separator = self._buffer, self._format.end_marker, self._format.separator
        start = self._pos = _skip_whitespace(buffer, self._pos)
        if start == len(buffer):
            return False
        if end and buffer.startswith(end, start):
            self._pos = self._mark = start + len(end)
        elif end and end.startswith(buffer[start:]):
            return False
        elif separator and buffer.startswith(separator, start):
            self._pos, self._state = start + len(separator), "before_object"
            return True
        else:  # the run ends without its end marker: what follows is content
            self._pos = self._mark
        self._state, self._after_call = "content", True
        return True

    # ---------------------------------------------------------------------- calls

    def _stream_call(self, reader: CallObjectReader) -> None:
        arguments = reader.take_arguments()
        if self._call_id is None:
            self._call_id = new_tool_call_id()
            self._add_delta(ParsedToolCallDelta(self._index, self._call_id, reader.name, arguments))
        elif arguments:
            self._add_delta(ParsedToolCallDelta(self._index, arguments=arguments))
        self._mark = self._pos  # the call is out: its text is no longer content

    def _end_call(self, reader: CallObjectReader) -> None:
        if self._streaming:
            if not reader.has_arguments:
                self._add_delta(ParsedToolCallDelta(self._index, arguments="{}"))
            self._close_call()
        else:
            arguments = reader.arguments if reader.has_arguments else {}
            self.calls.append(ParsedToolCall(reader.name, json.dumps(arguments, ensure_ascii=False)))
            self._index += 1
        self._mark, self._reader, self._state = self._pos, None, "after_object"

    def _fail(self) -> None:
        """The run is not (or no longer) calls: its text up to here is content,
        unless a streamed call is already out; then that call ends here."""
        if self._call_id is not None:
            self._close_call()
            self._after_call = True
        else:
            self._give_content(self._buffer[self._mark:self._pos])
            self._after_call = False
        self._mark, self._reader, self._state = self._pos, None, "content"

    def _close_call(self) -> None:
        self._index, self._call_id = self._index + 1, None

    def _add_delta(self, delta: ParsedToolCallDelta) -> None:
        last = self.deltas[-1] if self.deltas else None
        if last is not None and last.index == delta.index and delta.id is None:
            self.deltas[-1] = replace(last, arguments=last.arguments + delta.arguments)
        else:
            self.deltas.append(delta)

    def _give_content(self, text: str) -> None:
        if text:
            self.content.append(text)


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _could_begin(text: str, markers: tuple[str, ...]) -> bool:
    """Whether ``text`` is the beginning of a marker, not yet all of it."""
    return any(len(text) < len(marker) and marker.startswith(text) for marker in markers)


def _held_suffix(text: str, pos: int, markers: tuple[str, ...]) -> int:
    """Where the longest tail of ``text[pos:]`` that could begin a marker starts (``len(text)``: none)."""
    longest = max((len(marker) for marker in markers), default=1)
    for start in range(max(pos, len(text) - longest + 1), len(text)):
        if _could_begin(text[start:], markers):
            return start
    return len(text)
