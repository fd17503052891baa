"""Server-sent events: how the streaming routes frame what they send.

Each event is ``data: <compact JSON>`` and a blank line; a stream ends with
``data: [DONE]``. An error after streaming began is an event carrying the error
body (errors.py), since the status line has already gone out.
"""

from __future__ import annotations

import json

from lmserve.frontends.openai.errors import error_body

#: The last event of every stream.
SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_error(status: int, message: str, param: str | None = None) -> str:
    """An error sent as a stream event, after streaming began."""
    return sse_event(error_body(status, message, param))
