"""Request limits: admission of generation requests and the body size.

At most ``--max-concurrent-requests`` generation requests run at once; up to
``--max-queued-requests`` more wait, first come first served; beyond that a
request gets a 503 with ``Retry-After``. A waiting request whose client leaves
(its handler is cancelled) leaves the queue. Every other route is unlimited.

A generation route says so where it is declared: its handler is decorated with
:func:`admitted`, which takes a slot of the app's :class:`AdmissionQueue`
(``app.ctx.admission``, made by :func:`setup_limits` from the flags) for as long
as the handler runs, a stream until it ends. Nothing is wrapped after
registration.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from contextlib import suppress
from inspect import isawaitable

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from lmserve.core.plugins import PluginError
from lmserve.frontends.openai.errors import error_response
from lmserve.frontends.openai.http_config import HTTPConfig

#: Seconds a client told "busy" is asked to wait before trying again.
RETRY_AFTER_S = 1


class AdmissionQueue:
    """At most ``max_running`` holders at once, up to ``max_waiting`` more queued in order.

    ``max_running`` None admits everyone (the counts are still kept, for ``/metrics``).
    """

    def __init__(self, max_running: int | None, max_waiting: int = 0):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.num_running = 0
        self.num_rejected = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """Wait for a slot; False at once when the queue is full. Cancellable while waiting."""
        if self.max_running is None or (self.num_running < self.max_running and not self._waiters):
            self.num_running += 1
            return True
        if len(self._waiters) >= self.max_waiting:
            self.num_rejected += 1
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over: num_running stays
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot arrived just as the caller left: pass it on
            else:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return True

    def release(self) -> None:
        """Give a slot back: to the first live waiter, or to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.num_running -= 1


def busy_response(admission: AdmissionQueue) -> HTTPResponse:
    return error_response(
        503,
        f"The server is busy: generation requests running: {admission.num_running}, waiting: "
        f"{admission.num_waiting} (the most it queues). Retry after {RETRY_AFTER_S} s.",
        retry_after=RETRY_AFTER_S,
    )


def admitted(handler):
    """Decorator of a generation handler: it runs only once the app's admission queue
    gives it a slot, and holds the slot until it returns (a 503 when the queue is full).

    ``handler``'s first argument is the request; the queue is ``request.app.ctx.admission``.
    """

    @functools.wraps(handler)
    async def admitted_handler(request: Request, *args, **kwargs):
        admission: AdmissionQueue = request.app.ctx.admission
        if not await admission.acquire():
            return busy_response(admission)
        try:
            response = handler(request, *args, **kwargs)
            if isawaitable(response):
                response = await response  # a streaming handler returns when its stream ends
            return response
        finally:
            admission.release()

    return admitted_handler


def setup_limits(app: Sanic, config: HTTPConfig) -> AdmissionQueue:
    """Cap the body size, and make the queue :func:`admitted` handlers go through (``app.ctx.admission``)."""
    app.config.REQUEST_MAX_SIZE = config.max_request_bytes
    admission = AdmissionQueue(config.max_concurrent_requests, config.max_queued_requests or 0)
    app.ctx.admission = admission
    return admission


def refuse_generation_flags(app: Sanic) -> None:
    """Stop the start-up when a route asks for admission with ``ctx_generation=True``.

    That flag wrapped a route after registration; a generation route is now declared
    with :func:`admitted`. Refusing it beats serving the route without the limits.
    """
    flagged = sorted(route.name for route in app.router.routes if getattr(route.ctx, "generation", False))
    if flagged:
        raise PluginError(
            f"Route(s) {', '.join(flagged)} were registered with ctx_generation=True, which no longer "
            "admits them: decorate the handler with lmserve.frontends.openai.limits.admitted instead."
        )
