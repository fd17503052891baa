"""Requests the server stops itself: past ``--response-timeout``, and at the end of
the shutdown drain (``--shutdown-timeout``).

:func:`cut` tells a request why (``request.ctx.cut``: the :class:`APIError` its
client will read) and cancels the task that runs its handler, as Sanic does for a
client that leaves: the cancellation reaches ``RequestBus.generate``, whose
``finally`` aborts the generation in the engine. What the client sees:

- before its response began: the error's status and body (Sanic answers with the
  connection's ``exception``, which :func:`cut` sets), then the connection closes;
- in the middle of a stream: the stream's last words, written by the stream writer
  through :func:`end_cut_stream` (SSE: an error event and ``data: [DONE]``;
  NDJSON: a last line with the error), then the end of the body. Without them a
  stream cut at shutdown just stopped, with no error, no ``finish_reason`` and no
  ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress

from sanic import Request, Sanic
from sanic.http import Stage

from lmserve.frontends.http.errors import APIError

#: Seconds a cut stream's last words may take to go out (a client that reads nothing
#: would hold them, and the connection, for ever).
LAST_WORDS_TIMEOUT_S = 1.0


def setup_cuts(app: Sanic) -> None:
    """Note which task runs each request's handler, so that :func:`cut` can cancel it."""

    # First of the request middleware; Sanic runs it again on a request whose error it
    # answers, hence the check.
    @app.on_request(priority=2000)
    async def note_handler_task(request: Request):
        if getattr(request.ctx, "handler_task", None) is None:
            request.ctx.handler_task = asyncio.current_task()


def cut(request: Request, error: APIError) -> bool:
    """Stop ``request`` with ``error``; False when it has already finished."""
    task: asyncio.Task | None = getattr(request.ctx, "handler_task", None)
    http = request.stream  # Sanic's Http of the connection; None once the response is done
    if task is None or task.done() or http is None or http.request is not request:
        return False
    if getattr(request.ctx, "cut", None) is None:  # the first reason stands
        request.ctx.cut = error
        http.exception = error  # what Sanic answers when no response has begun
        task.cancel()
    return True


def cut_error(request: Request) -> APIError | None:
    """Why the server cut ``request``; None when it did not (a client that left, say)."""
    return getattr(request.ctx, "cut", None)


async def end_cut_stream(request: Request, last_words: Callable[[APIError], str]) -> None:
    """When the server cut ``request`` in the middle of its stream: send
    ``last_words(error)`` and end the body. A stream writer calls it on
    ``CancelledError``, then lets the cancellation go on::

        except asyncio.CancelledError:
            await end_cut_stream(request, sse_cut_ending)
            raise

    Nothing happens for a request the server did not cut (a client that left), or
    whose response has not begun (Sanic answers the error's status instead).
    """
    error = cut_error(request)
    http = request.stream
    if error is None or http is None or http.stage is not Stage.RESPONSE or http.response is None:
        return
    with suppress(Exception):  # the client may have left as well
        await asyncio.wait_for(http.response.send(last_words(error), end_stream=True), LAST_WORDS_TIMEOUT_S)
