"""``POST /v1/sessions``: a new interactive session under an id the server chose
(an lmserve extension), and who a session belongs to.

An interactive session belongs to its owner: the API key that opened it (its tag,
:func:`~lmserve.frontends.http.auth.request_owner`), or nobody on a server without
keys. A key sees only its own sessions; another key's is as absent as an unknown
one (:func:`no_such_session`). Without keys a ``session_id`` protects nothing:
anyone who names it uses it; an id from this route is one nobody can guess.

Each session also counts toward a client (:func:`request_client`: the key's tag, or
the address that opened it), bounded by ``--max-sessions-per-client`` and
``--max-session-tokens-per-client`` (:func:`session_limits`): past either, a 429.
"""

from __future__ import annotations

from sanic import Request, Sanic
from sanic.response import json as json_response

from lmserve.core.sessions import SessionLimitError, SessionLimits
from lmserve.frontends.interactive.protocol import SessionCreated
from lmserve.frontends.http.auth import request_owner
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.http_config import HTTPConfig
from lmserve.frontends.http.openapi import RouteDoc
from lmserve.frontends.http.state import ServerState

#: The route's entry in /openapi.json.
CREATE_SESSION_DOC = RouteDoc(
    "Open an interactive session under an id the server chose (lmserve)", "Interactive",
    response=SessionCreated, errors=(429,),
    description="Reserves a new, empty session for the caller and answers its `session_id`: random in "
    "[1, 2^53), unused, so nobody can guess it. Its turns go to `/v1/chat/interactive` as usual. It counts "
    "toward the caller's `--max-sessions-per-client` (429 past it) and is ended like any session: by the "
    "client, or after `--session-ttl` idle. With `--api-keys` a session belongs to the key that opened it; "
    "another key can neither see nor end it.",
)


def register_session_routes(app: Sanic, state: ServerState) -> None:
    limits = session_limits(state)

    async def create_session(request: Request):
        try:
            session = state.bus.sessions.reserve(owner=request_owner(request), client=request_client(request),
                                                 limits=limits)
        except SessionLimitError as exc:
            raise too_many(exc) from exc
        return json_response({"session_id": session.session_id})

    app.add_route(create_session, "/v1/sessions", methods=["POST"], name="create_session",
                  ctx_doc=CREATE_SESSION_DOC)


def session_limits(state: ServerState) -> SessionLimits:
    """Each client's limits, from the server's flags."""
    config = HTTPConfig.from_options(state.config.options)
    return SessionLimits(config.max_sessions_per_client, config.max_session_tokens_per_client)


def request_client(request: Request) -> str:
    """Whose limits a session ``request`` opens counts toward: its API key's tag, or its address."""
    owner = request_owner(request)
    if owner is not None:
        return owner
    return f"address {request.remote_addr or request.ip}"


def no_such_session(session_id: int) -> APIError:
    """The 404 of a session the caller does not hold: the same whether another key holds it or nobody."""
    return APIError(404, f"No session {session_id}.", "session_id")


def too_many(exc: SessionLimitError) -> APIError:
    return APIError(429, str(exc), "session_id")
