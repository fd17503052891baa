"""Graceful shutdown (``--shutdown-timeout``): SIGTERM lets in-flight requests finish.

What Sanic 25.12 does on SIGTERM or SIGINT with ``single_process=True``: it
stops the loop, runs the ``before_server_stop`` listeners, closes the listening
socket and the idle connections, then runs the loop until every connection has
closed or ``GRACEFUL_SHUTDOWN_TIMEOUT`` seconds have passed; it aborts the
connections left (their handlers are cancelled, so their generations are
aborted) and runs the ``after_server_stop`` listeners. ``app.run`` then returns
and the command exits with status 0.

Three things make that work for an LLM server:

- the engine must keep stepping while requests drain, so it is stopped in
  ``after_server_stop`` (see ``app.py``), not before;
- a connection whose response ends during the drain would stay open as an idle
  keep-alive connection and hold the drain up to ``KEEP_ALIVE_TIMEOUT``: every
  request in flight when the drain begins (and any response begun after) is
  marked ``Connection: close``;
- Sanic's abort would end a stream mid-body, without a word: at
  ``--shutdown-timeout`` the requests still running are
  :func:`~lmserve.frontends.http.cuts.cut` instead (a 503, or a stream's error
  event and ``data: [DONE]``), and Sanic's own deadline comes
  :data:`LAST_WORDS_GRACE_S` later, for those words to go out.
"""

from __future__ import annotations

import asyncio
import weakref

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from lmserve.frontends.http.cuts import LAST_WORDS_TIMEOUT_S, cut
from lmserve.frontends.http.errors import APIError

#: Seconds between cutting the requests left and Sanic aborting their connections.
LAST_WORDS_GRACE_S = LAST_WORDS_TIMEOUT_S + 1.0


def setup_graceful_shutdown(app: Sanic, timeout_s: float) -> None:
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = timeout_s + LAST_WORDS_GRACE_S
    in_flight: weakref.WeakSet[Request] = weakref.WeakSet()
    draining = False

    def close_after_response(request: Request) -> None:
        http = request.stream  # Sanic's Http of the connection; None once the response is done
        if http is not None:
            http.keep_alive = False

    @app.on_request(priority=1000)
    async def track_request(request: Request):
        in_flight.add(request)

    @app.on_response(priority=1000)
    async def close_when_draining(request: Request, response: HTTPResponse):
        if draining:
            close_after_response(request)

    @app.before_server_stop
    async def begin_drain(app: Sanic):
        nonlocal draining
        draining = True
        for request in list(in_flight):
            close_after_response(request)
        asyncio.get_running_loop().call_later(timeout_s, cut_the_rest)

    def cut_the_rest() -> None:
        error = APIError(503, f"The server is shutting down; requests still running after "
                              f"{timeout_s:g} s are stopped.")
        for request in list(in_flight):
            cut(request, error)
