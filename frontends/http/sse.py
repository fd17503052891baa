"""Server-sent events: how the streaming routes frame what they send.

Each event is ``data: <compact JSON>`` and a blank line; a stream ends with
``data: [DONE]``. An error after streaming began is an event carrying the error
body (errors.py), since the status line has already gone out; so is the reason
a stream was cut (the response timeout, shutdown: :func:`sse_cut_ending`).

SSE separates lines with CR and LF only, but many clients split with Python's
``str.splitlines`` (``requests``' ``iter_lines(decode_unicode=True)``), which also breaks
at U+0085, U+2028 and U+2029. Two things keep every event one line for them:

- the content type names its charset (``SSE_CONTENT_TYPE``): without it ``requests``
  decodes ``text/*`` as Latin-1, and the UTF-8 continuation byte 0x85 of characters
  such as "ą" or Cyrillic "х" turns into U+0085 (a 64-user soak found 5 streams in 25,000 come apart);
- the JSON escapes those three characters when a model emits them itself.
"""

from __future__ import annotations

import json

from lmserve.frontends.http.errors import APIError, error_body

#: What a streaming route declares; the charset keeps clients from guessing Latin-1.
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"

#: The last event of every stream.
SSE_DONE = "data: [DONE]\n\n"


#: Line breaks to some splitters that JSON need not escape (control characters it escapes anyway).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line_json(payload: dict, separators: tuple[str, str] = (",", ":")) -> str:
    """``payload`` as JSON (compact by default) that every line splitter sees as one line."""
    return json.dumps(payload, ensure_ascii=False, separators=separators).translate(_LINE_BREAKS)


def sse_event(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return "data: " + one_line_json(payload) + "\n\n"


def sse_error(status: int, message: str, param: str | None = None) -> str:
    """An error sent as a stream event, after streaming began."""
    return sse_event(error_body(status, message, param))


def sse_cut_ending(error: APIError) -> str:
    """The end of a stream the server cut: the reason as an error event, then ``[DONE]``."""
    return sse_error(error.status, error.message, error.param) + SSE_DONE
