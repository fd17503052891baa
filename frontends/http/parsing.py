"""Request bodies: JSON in, a validated pydantic model out, or a 400 naming the field.

Every route that reads a JSON body goes through :func:`parse_json` (most through
:func:`parse_body`), which refuses a body nesting deeper than
:data:`MAX_JSON_DEPTH` before parsing it: Python's JSON parser recurses once per
level, and a body of 1,000 ``[`` was a 500 (RecursionError) on every route.
"""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any

import pydantic
from sanic import Request

from lmserve.frontends.http.errors import APIError

#: The deepest nesting of arrays and objects a body may have. Real requests nest far
#: less: a JSON schema ten objects deep in ``response_format`` or a tool's
#: ``parameters`` puts its innermost value about 25 levels down.
MAX_JSON_DEPTH = 64

#: Every byte but the four brackets and the quote (``bytes.translate`` deletes them).
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'[]{}"')
#: What each bracket does to the depth.
_STEP = [0] * 256
for _bracket, _step in ((b"[", 1), (b"{", 1), (b"]", -1), (b"}", -1)):
    _STEP[_bracket[0]] = _step


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of JSON text ``raw`` nest (0: a bare value).

    Linear and without recursion: strings are cut out first (their brackets are
    text), then the brackets left are counted. Text that is not JSON gets a number
    too; the parser says what is wrong with it.
    """
    # Escaped backslashes go first, so that every backslash left escapes the next
    # character: then no quote left is escaped, and quotes alternate open, close.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.translate(None, _NOT_STRUCTURE).split(b'"')[::2])
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def parse_json(raw: bytes | None) -> Any:
    """The JSON value of a request body; a 400 when it is not JSON or nests too deep."""
    raw = raw or b""
    # Counting the openers is enough for most bodies (and ~100x faster than json_depth).
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise APIError(400, f"The body nests deeper than {MAX_JSON_DEPTH} levels.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The body is not valid JSON: {exc}.") from exc
    except RecursionError as exc:  # a deep body in an encoding the depth count misread
        raise APIError(400, f"The body nests deeper than {MAX_JSON_DEPTH} levels.") from exc


def request_json(request: Request) -> Any:
    """:func:`parse_json` of the request's body, parsed once per request (admission
    weighs the body before the handler validates it)."""
    ctx = getattr(request, "ctx", None)
    if ctx is not None and hasattr(ctx, "json_body"):
        return ctx.json_body
    data = parse_json(request.body)
    if ctx is not None:
        ctx.json_body = data
    return data


def parse_body(request: Request, model: type[pydantic.BaseModel]):
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(400, "The body must be JSON: send Content-Type: application/json.")
    data = request_json(request)
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        # The deepest error is the most specific one (a union tries every member).
        first = max(exc.errors(), key=lambda error: len(error["loc"]))
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from exc
    except RecursionError as exc:  # a validator that walks the value recursively
        raise APIError(400, f"The body nests too deep to validate (at most {MAX_JSON_DEPTH} levels).") from exc


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried (``str``, ``list[int]``, ``TextPart``) in ``loc``."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "none")
    )
