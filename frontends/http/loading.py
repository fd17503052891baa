"""The port's answer while the model loads: 503 to everything, in the API's error shape.

Loading takes seconds to minutes; an orchestrator probing ``/health`` in that
time should see "not ready yet" (503 with ``Retry-After``), not a refused
connection it cannot tell from a crash. A tiny standard-library server holds the
port until the real one is about to bind it.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmserve.frontends.http.errors import error_body

_BODY = json.dumps(error_body(503, "The model is still loading; retry shortly.")).encode()


class _LoadingHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(_BODY)))
        self.send_header("Retry-After", "5")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(_BODY)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _answer

    def log_message(self, format, *args) -> None:  # quiet: the server's log is for the real one
        pass


class LoadingServer:
    """``start()``, load, ``stop()``: the port answers 503 meanwhile."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Bind the port (``OSError`` when it is taken) and start answering."""
        server_class = type("_Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in self.host else socket.AF_INET,
            "daemon_threads": True,
        })
        self._server = server_class((self.host, self.port), _LoadingHandler)
        threading.Thread(target=self._server.serve_forever, name="lmserve-loading", daemon=True).start()

    def stop(self) -> None:
        """Free the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
