"""Errors in OpenAI's shape, with LMDeploy's top-level fields alongside.

Body: ``{"error": {"object": "error", "message", "type", "param", "code"},
"object": "error", "message", "type", "param", "code"}`` - OpenAI SDKs read
``error`` (``err.body``); LMDeploy's clients read the top-level ``code`` (the HTTP
status).
"""

from __future__ import annotations

from sanic import HTTPResponse
from sanic.response import json as json_response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raised by a route to answer with an error body and status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    detail = {
        "object": "error",
        "message": message,
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": status,
    }
    return {"error": detail, **detail}


def error_response(status: int, message: str, param: str | None = None,
                   retry_after: int | None = None) -> HTTPResponse:
    """The error body as a response; ``retry_after`` (seconds) sets ``Retry-After``."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response(error_body(status, message, param), status=status, headers=headers)

