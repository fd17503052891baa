"""API keys (``--api-keys``): ``Authorization: Bearer <key>`` on the API routes.

Routes under ``/v1/`` and the tokenizer routes ``/tokenize`` and ``/detokenize``
need a key; ``/health``, ``/metrics``, ``/openapi.json`` and the docs stay open.
The decision is made on the matched route (its normalised path), not the raw
URL, so ``/tokenize/`` and other spellings the router accepts are covered.

The key that matched names the request's owner (:func:`request_owner`): a tag
made of its place in ``--api-keys`` (``key-1``, ``key-2``, ...), never the key
itself, which appears in no log. Interactive sessions belong to their owner.
"""

from __future__ import annotations

import hmac

from sanic import Request, Sanic

from lmserve.frontends.http.errors import error_response

#: Paths (as Sanic normalises them: no leading or trailing slash) that need a key.
PROTECTED_PREFIX = "v1/"
PROTECTED_PATHS = frozenset({"v1", "tokenize", "detokenize"})


def needs_api_key(request: Request) -> bool:
    if request.route is not None:
        path = request.route.path
    else:  # no route matched: the answer is a 404 or 405, but not before the key is checked
        path = request.path.strip("/")
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def request_owner(request: Request) -> str | None:
    """The tag of the API key that authenticated ``request`` (``key-2``: the second of
    ``--api-keys``); None on a server without keys, or on a route that needs none."""
    return getattr(request.ctx, "api_key_owner", None)


class APIKeys:
    """Checks a request's bearer token against every key in constant time."""

    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ValueError("APIKeys needs at least one key.")
        self._keys = tuple(key.encode() for key in keys)

    def owner(self, authorization: str | None) -> str | None:
        """The tag of the key ``authorization`` carries (``key-N``, N its place in the list,
        the first if listed twice); None when it carries none of them."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        # Sanic decodes header bytes as UTF-8 with surrogateescape: this gives back the bytes sent.
        candidate = token.strip().encode("utf-8", "surrogateescape")
        matched = None
        for number, key in enumerate(self._keys, 1):  # every key, whatever matched: no timing hint of which
            if hmac.compare_digest(candidate, key) and matched is None:
                matched = f"key-{number}"
        return matched

    def accepts(self, authorization: str | None) -> bool:
        return self.owner(authorization) is not None


def setup_auth(app: Sanic, api_keys: tuple[str, ...]) -> None:
    """Answer 401 to API requests without a valid key; nothing when ``api_keys`` is empty."""
    if not api_keys:
        return
    keys = APIKeys(api_keys)

    @app.on_request
    async def check_api_key(request: Request):
        if not needs_api_key(request):
            return None
        owner = keys.owner(request.headers.get("authorization"))
        if owner is None:
            response = error_response(401, "A valid API key is required: send 'Authorization: Bearer <key>'.")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        request.ctx.api_key_owner = owner
        return None
