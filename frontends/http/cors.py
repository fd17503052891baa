"""CORS (``--allow-origins`` and friends): headers for browsers on other origins.

With no allowed origin nothing is added. Otherwise a request whose ``Origin``
is allowed gets ``Access-Control-Allow-Origin`` (and ``-Credentials``) on its
response, errors included, and a preflight (``OPTIONS`` with
``Access-Control-Request-Method``) is answered here, before routing, auth and
limits: browsers send no credentials on a preflight.
"""

from __future__ import annotations

import re

from sanic import Request, Sanic
from sanic.response import HTTPResponse, empty

from lmserve.frontends.http.errors import error_response
from lmserve.frontends.http.http_config import HTTPConfig

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
#: Seconds a browser may cache a preflight answer.
PREFLIGHT_MAX_AGE_S = 600
#: A header name (RFC 9110 token), lower-cased; nothing else is echoed back.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")


class CORSPolicy:
    def __init__(self, origins: tuple[str, ...], methods: tuple[str, ...], headers: tuple[str, ...],
                 credentials: bool):
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.any_method = "*" in methods
        self.methods = ALL_METHODS if self.any_method else methods
        self.any_header = "*" in headers
        self.headers = frozenset(headers)
        self.credentials = credentials

    def allows_origin(self, origin: str) -> bool:
        if not (origin.isascii() and origin.isprintable()):  # never echo odd bytes back
            return False
        return self.any_origin or origin in self.origins

    def origin_headers(self, origin: str) -> dict[str, str]:
        """The headers every response to an allowed ``origin`` carries."""
        if self.any_origin and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        # A named origin (credentials forbid "*"): caches must key on Origin.
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight(self, request: Request) -> HTTPResponse:
        origin = request.headers["origin"]
        method = request.headers["access-control-request-method"].strip().upper()
        asked = [name.strip().lower() for name in request.headers.get("access-control-request-headers", "").split(",")]
        asked = [name for name in asked if name]
        if not self.allows_origin(origin):
            return error_response(400, f"CORS: the origin {origin!r} is not allowed.")
        if not self.any_method and method not in self.methods:
            return error_response(400, f"CORS: the method {method!r} is not allowed.")
        refused = [name for name in asked if not _HEADER_NAME.fullmatch(name)
                   or not (self.any_header or name in self.headers)]
        if refused:
            return error_response(400, f"CORS: the header {refused[0]!r} is not allowed.")
        headers = {
            **self.origin_headers(origin),
            "Access-Control-Allow-Methods": ", ".join(self.methods),
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        }
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(asked)
        if "Vary" not in headers:
            headers["Vary"] = "Origin"
        return empty(status=204, headers=headers)


def is_preflight(request: Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "origin" in request.headers
        and "access-control-request-method" in request.headers
    )


def setup_cors(app: Sanic, config: HTTPConfig) -> None:
    """Add the CORS middleware; nothing when no origin is allowed.

    Register before other request middleware: a preflight is answered first.
    """
    if not config.allow_origins:
        return
    policy = CORSPolicy(config.allow_origins, config.allow_methods, config.allow_headers, config.allow_credentials)

    @app.on_request(priority=100)
    async def cors_preflight(request: Request):
        return policy.preflight(request) if is_preflight(request) else None

    @app.on_response(priority=100)
    async def cors_headers(request: Request, response: HTTPResponse):
        origin = request.headers.get("origin")
        if origin is None or is_preflight(request) or not policy.allows_origin(origin):
            return
        for name, value in policy.origin_headers(origin).items():
            if name == "Vary" and "vary" in response.headers:
                response.headers["Vary"] = f"{response.headers['vary']}, Origin"
            else:
                response.headers[name] = value
