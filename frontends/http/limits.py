"""Request limits: admission of generation requests and the body size.

``--max-concurrent-requests`` bounds the generations running at once, counted
by their weight: a request's choices, ``n`` times its prompts (a completions
``prompt`` may be a list), the sequences it will run in the engine. So a
request with ``n: 64`` takes 64 of the budget, and ``n: 64`` from four clients
cannot slip past a limit of 16. Requests are admitted first come, first served
while their weight fits beside the running ones; a request at the head of the
queue that does not fit yet holds back the lighter ones behind it (it is never
starved), and runs once enough others finish. A request heavier than the whole
budget could never run: it gets a 400 naming ``n`` (or ``prompt``) at once.
Up to ``--max-queued-requests`` requests (counted one each, whatever their
weight) wait; beyond that a request gets a 503 with ``Retry-After``. A waiting
request whose client leaves (its handler is cancelled) leaves the queue. Every
other route is unlimited.

A generation route says so where it is declared: its handler is decorated with
:func:`admitted`, which weighs the body (:func:`request_weight`) and takes that
much of the app's :class:`AdmissionQueue` (``app.ctx.admission``, made by
:func:`setup_limits` from the flags) for as long as the handler runs, a stream
until it ends. Nothing is wrapped after registration.
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
from lmserve.frontends.http.errors import APIError, error_response
from lmserve.frontends.http.http_config import HTTPConfig
from lmserve.frontends.http.parsing import request_json

#: Seconds a client told "busy" is asked to wait before trying again.
RETRY_AFTER_S = 1


class AdmissionQueue:
    """Generations of weight at most ``max_running`` at once, up to ``max_waiting`` more
    requests queued in order.

    ``max_running`` None admits everyone (the counts are still kept, for ``/metrics``).
    ``num_running`` counts the requests admitted, ``num_running_weight`` their weight.
    """

    def __init__(self, max_running: int | None, max_waiting: int = 0):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.num_running = 0
        self.num_running_weight = 0
        self.num_rejected = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def too_heavy(self, weight: int) -> bool:
        """Whether a request of ``weight`` could never run, even alone."""
        return self.max_running is not None and weight > self.max_running

    async def acquire(self, weight: int = 1) -> bool:
        """Wait until ``weight`` fits; False at once when the queue is full. Cancellable while waiting."""
        if self.max_running is None or (not self._waiters and self._fits(weight)):
            self._take(weight)
            return True
        if len(self._waiters) >= self.max_waiting:
            self.num_rejected += 1
            return False
        waiter = asyncio.get_running_loop().create_future()
        entry = (waiter, weight)
        self._waiters.append(entry)
        try:
            await waiter  # _admit_waiters() took the weight for it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(weight)  # admitted just as the caller left: pass it on
            else:
                with suppress(ValueError):
                    self._waiters.remove(entry)
                self._admit_waiters()  # it may have held back lighter ones behind it
            raise
        return True

    def release(self, weight: int = 1) -> None:
        """Give ``weight`` back, and admit the waiters at the head of the queue that now fit."""
        self.num_running -= 1
        self.num_running_weight -= weight
        self._admit_waiters()

    def _fits(self, weight: int) -> bool:
        return self.max_running is None or self.num_running_weight + weight <= self.max_running

    def _take(self, weight: int) -> None:
        self.num_running += 1
        self.num_running_weight += weight

    def _admit_waiters(self) -> None:
        while self._waiters:
            waiter, weight = self._waiters[0]
            if waiter.done():  # cancelled, its task not yet resumed
                self._waiters.popleft()
                continue
            if not self._fits(weight):
                return  # first come, first served: nobody overtakes the head
            self._waiters.popleft()
            self._take(weight)
            waiter.set_result(None)


def request_weight(body) -> int:
    """The generations a generation request's JSON body asks for: ``n`` (default 1) times
    its prompts (a completions ``prompt`` that is a list of texts or of token lists), at
    least 1. A body it cannot read weighs 1: the handler answers it with its own error."""
    if not isinstance(body, dict):
        return 1
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return n * prompts


def _json_body(request: Request):
    """The body's JSON value, or None when it is not JSON (the handler reports that)."""
    try:
        return request_json(request)
    except APIError:
        return None


def too_heavy_response(admission: AdmissionQueue, weight: int, body) -> HTTPResponse:
    param = "n" if isinstance(body, dict) and request_weight({"n": body.get("n")}) > 1 else "prompt"
    return error_response(
        400,
        f"The request asks for {weight} generations (n x prompts), but this server runs at most "
        f"{admission.max_running} at once (--max-concurrent-requests): ask for fewer.",
        param,
    )


def busy_response(admission: AdmissionQueue) -> HTTPResponse:
    return error_response(
        503,
        f"The server is busy: generation requests running: {admission.num_running}, waiting: "
        f"{admission.num_waiting} (the most it queues). Retry after {RETRY_AFTER_S} s.",
        retry_after=RETRY_AFTER_S,
    )


def admitted(handler):
    """Decorator of a generation handler: it runs only once the app's admission queue
    admits its weight (:func:`request_weight`), and holds it until it returns (a 503 when
    the queue is full, a 400 when the weight exceeds the whole budget).

    ``handler``'s first argument is the request; the queue is ``request.app.ctx.admission``.
    """

    @functools.wraps(handler)
    async def admitted_handler(request: Request, *args, **kwargs):
        admission: AdmissionQueue = request.app.ctx.admission
        body = _json_body(request) if admission.max_running is not None else None
        weight = request_weight(body)
        if admission.too_heavy(weight):
            return too_heavy_response(admission, weight, body)
        if not await admission.acquire(weight):
            return busy_response(admission)
        try:
            response = handler(request, *args, **kwargs)
            if isawaitable(response):
                response = await response  # a streaming handler returns when its stream ends
            return response
        finally:
            admission.release(weight)

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
            "admits them: decorate the handler with lmserve.frontends.http.limits.admitted instead."
        )
