"""Request bodies: JSON in, a validated pydantic model out, or a 400 naming the field."""

from __future__ import annotations

import json

import pydantic
from sanic import Request

from lmserve.frontends.openai.errors import APIError


def parse_body(request: Request, model: type[pydantic.BaseModel]):
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(400, "The body must be JSON: send Content-Type: application/json.")
    try:
        data = json.loads(request.body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The body is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        # The deepest error is the most specific one (a union tries every member).
        first = max(exc.errors(), key=lambda error: len(error["loc"]))
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from exc


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried (``str``, ``list[int]``, ``TextPart``) in ``loc``."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "none")
    )

