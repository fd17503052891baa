"""Graceful shutdown (``--shutdown-timeout``): SIGTERM lets in-flight requests finish.

What Sanic 25.12 does on SIGTERM or SIGINT with ``single_process=True``: it
stops the loop, runs the ``before_server_stop`` listeners, closes the listening
socket and the idle connections, then runs the loop until every connection has
closed or ``GRACEFUL_SHUTDOWN_TIMEOUT`` seconds have passed; it aborts the
connections left (their handlers are cancelled, so their generations are
aborted) and runs the ``after_server_stop`` listeners. ``app.run`` then returns
and the command exits with status 0.

Two things make that work for an LLM server:

- the engine must keep stepping while requests drain, so it is stopped in
  ``after_server_stop`` (see ``app.py``), not before;
- a connection whose response ends during the drain would stay open as an idle
  keep-alive connection and hold the drain up to ``KEEP_ALIVE_TIMEOUT``: every
  request in flight when the drain begins (and any response begun after) is
  marked ``Connection: close``.
"""

from __future__ import annotations

import weakref

from sanic import Request, Sanic
from sanic.response import HTTPResponse


def setup_graceful_shutdown(app: Sanic, timeout_s: float) -> None:
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = timeout_s
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
