"""Timeouts for slow clients (``--request-timeout``) and slow responses (``--response-timeout``).

Sanic 25.12 measures its ``REQUEST_TIMEOUT`` from the last byte received (every
byte starts it again), and only while headers arrive: a body is read under
``RESPONSE_TIMEOUT``, which lmserve sets to a day (a long generation sends
nothing until it is done). So a client that sent a header byte every few
seconds, or stopped half way through its body, held its connection for ever
(checked to 200 s). :class:`TimedHttpProtocol` holds every HTTP/1.1 connection to:

- **headers**: at most ``request_timeout`` seconds from a request's first byte
  to the end of its headers, however steadily they trickle; a new connection
  must send its first byte within ``request_timeout`` too;
- **body**: no pause longer than ``request_timeout`` while the body is read (or,
  after an early answer, drained);

and otherwise keeps Sanic's rules: an idle keep-alive connection closes after
``KEEP_ALIVE_TIMEOUT``; a response being sent is not a slow request (a stream may
last hours). A request over a limit is answered 408 when an answer can still go
out, and its connection closes.

The response timeout (``--response-timeout``) is checked there too: a request
whose handler has run longer (from the end of its headers, a stream included) is
:func:`~lmserve.frontends.http.cuts.cut` with a 504, which aborts its
generation; a stream ends with an error event and ``data: [DONE]``.
"""

from __future__ import annotations

from time import monotonic, perf_counter

from sanic import Sanic
from sanic.exceptions import RequestTimeout, ServiceUnavailable
from sanic.http import Http, Stage
from sanic.log import error_logger
from sanic.server.protocols.http_protocol import HttpProtocol

from lmserve.frontends.http.cuts import cut
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.http_config import HTTPConfig

#: How often a connection's deadlines are checked, as a share of the shortest one:
#: a slow connection closes within 1.25 times its timeout.
CHECKS_PER_TIMEOUT = 4
#: The shortest interval between two checks of a connection, in seconds.
MIN_CHECK_INTERVAL_S = 0.1
#: The app's config key of ``--response-timeout`` (Sanic's RESPONSE_TIMEOUT is another
#: thing: the longest silence while a response is made).
RESPONSE_TIMEOUT_KEY = "LMSERVE_RESPONSE_TIMEOUT"


class TimedHttp(Http):
    """Sanic's HTTP/1.1 request cycle, telling its connection when each request begins."""

    __slots__ = ()

    def init_for_request(self):
        super().init_for_request()
        # A request waiting in the buffer (pipelined) begins now; one not sent yet
        # begins with its first byte (TimedHttpProtocol.data_received).
        self.protocol.request_began = monotonic()


class TimedHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 connection with a deadline for headers and a progress timeout
    for bodies (see the module's docstring)."""

    HTTP_CLASS = TimedHttp
    __slots__ = ("request_began", "received_any", "response_deadline_s")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_began = monotonic()
        self.received_any = False
        #: --response-timeout; 0: none.
        self.response_deadline_s: float = self.app.config.get(RESPONSE_TIMEOUT_KEY, 0)

    def data_received(self, data: bytes):
        http = self.http
        if http is None or (http.stage is Stage.IDLE and not _body_left(http)):
            self.request_began = monotonic()  # the first byte of a request
        self.received_any = True
        super().data_received(data)

    def check_timeouts(self):
        """Close a connection past one of its limits, or cut its request past the
        response timeout; check again soon."""
        try:
            http = self.http
            if not self._task or http is None:
                return
            if http.stage is Stage.HANDLER and http.upgrade_websocket:
                return  # a websocket has no timeouts (as in Sanic)
            expired = self._expired(http, monotonic())
            if expired is None:
                if self._past_response_deadline(http):
                    cut(http.request, APIError(504, f"The response took longer than this server allows "
                                               f"({self.response_deadline_s:g} s); the request was stopped."))
                self._callback_check_timeouts = self.loop.call_later(self._check_interval(), self.check_timeouts)
                return
            if isinstance(expired, Exception):
                http.exception = expired  # answered when an answer can still go out
            http.request_body = None  # nothing more to read or drain
            http.keep_alive = False
            self._task.cancel()
        except Exception:
            error_logger.exception("lmserve: checking a connection's timeouts")

    def _check_interval(self) -> float:
        shortest = min(self.keep_alive_timeout, self.request_timeout, self.response_deadline_s or float("inf"))
        return max(MIN_CHECK_INTERVAL_S, shortest / CHECKS_PER_TIMEOUT)

    def _past_response_deadline(self, http: Http) -> bool:
        """Whether the request in flight has run past --response-timeout (from the end of its headers)."""
        return bool(self.response_deadline_s and http.stage in (Stage.HANDLER, Stage.RESPONSE)
                    and http.request is not None and http.perft0 is not None
                    and perf_counter() - http.perft0 > self.response_deadline_s)

    def _expired(self, http: Http, now: float) -> Exception | bool | None:
        """The limit the connection is past (an exception to answer with, or True to
        close without a word); None when it is within all of them."""
        since_bytes = now - self._time  # the last byte received or sent
        if http.stage is Stage.REQUEST:
            if now - self.request_began > self.request_timeout:
                return RequestTimeout(f"The request's headers took longer than {self.request_timeout:g} s.")
        elif _body_left(http):  # a body being read, or drained after an early answer
            if since_bytes > self.request_timeout:
                return RequestTimeout(f"The request's body paused longer than {self.request_timeout:g} s.")
        elif http.stage is Stage.IDLE:
            # A connection that never sent a byte is no keep-alive connection: it gets
            # the request timeout (e.g. 30 s), not the keep-alive one (120 s).
            idle_limit = self.keep_alive_timeout if self.received_any else self.request_timeout
            return True if since_bytes > idle_limit else None
        elif since_bytes > self.response_timeout:  # Sanic's own, with lmserve's day
            return ServiceUnavailable("Response Timeout")
        return None


def _body_left(http: Http) -> bool:
    """Whether part of the request's body is still to be read (its slots are set per request)."""
    return bool(getattr(http, "request_body", None))


class TimedSanic(Sanic):
    """The Sanic app, serving its connections with :class:`TimedHttpProtocol` unless
    told to use another protocol (by ``app.run`` and ``app.create_server`` callers)."""

    __slots__ = ()

    def prepare(self, *args, protocol=None, **kwargs):
        return super().prepare(*args, protocol=protocol or TimedHttpProtocol, **kwargs)

    async def create_server(self, *args, protocol=None, **kwargs):
        return await super().create_server(*args, protocol=protocol or TimedHttpProtocol, **kwargs)


def setup_timeouts(app: Sanic, config: HTTPConfig) -> None:
    """The limits :class:`TimedHttpProtocol` holds connections to (``app.config``)."""
    app.config.REQUEST_TIMEOUT = config.request_timeout
    app.config[RESPONSE_TIMEOUT_KEY] = config.response_timeout
