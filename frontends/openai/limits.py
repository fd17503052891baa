"""Request limits: admission of generation requests and the body size.

At most ``--max-concurrent-requests`` generation requests run at once; up to
``--max-queued-requests`` more wait, first come first served; beyond that a
request gets a 503 with ``Retry-After``. A waiting request whose client leaves
(its handler is cancelled) leaves the queue. Every other route is unlimited.

Generation routes are the POST routes listed in :data:`GENERATION_PATHS`, or any
route registered with ``ctx_generation=True`` (``ctx_generation=False`` opts a
listed path out). Their handlers are wrapped once, after every route is
registered; the router calls ``route.handler`` at request time.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from contextlib import suppress
from inspect import isawaitable

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from lmserve.frontends.openai.errors import error_response
from lmserve.frontends.openai.http_config import HTTPConfig

#: Routes (Sanic's normalised paths) whose requests generate tokens.
GENERATION_PATHS = frozenset({"v1/chat/completions", "v1/completions"})
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


def is_generation_route(route) -> bool:
    flag = getattr(route.ctx, "generation", None)
    if flag is not None:
        return bool(flag)
    return route.path in GENERATION_PATHS and "POST" in route.methods


def busy_response(admission: AdmissionQueue) -> HTTPResponse:
    return error_response(
        503,
        f"The server is busy: generation requests running: {admission.num_running}, waiting: "
        f"{admission.num_waiting} (the most it queues). Retry after {RETRY_AFTER_S} s.",
        retry_after=RETRY_AFTER_S,
    )


def admitted(handler, admission: AdmissionQueue):
    """``handler`` run only once ``admission`` gives it a slot (a 503 when the queue is full)."""

    @functools.wraps(handler)
    async def admitted(request: Request, *args, **kwargs):
        if not await admission.acquire():
            return busy_response(admission)
        try:
            response = handler(request, *args, **kwargs)
            if isawaitable(response):
                response = await response  # a streaming handler returns when its stream ends
            return response
        finally:
            admission.release()

    return admitted


def setup_limits(app: Sanic, config: HTTPConfig) -> AdmissionQueue:
    """Cap the body size and admit generation requests through ``app.ctx.admission``.

    Call after every route is registered.
    """
    app.config.REQUEST_MAX_SIZE = config.max_request_bytes
    admission = AdmissionQueue(config.max_concurrent_requests, config.max_queued_requests or 0)
    app.ctx.admission = admission
    for route in app.router.routes:
        if is_generation_route(route):
            route.handler = admitted(route.handler, admission)
    return admission
