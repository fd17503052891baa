"""A benchmark's server: the URL given, or ``lmserve serve api_server`` started on a free
loopback port for the run and stopped after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import httpx


@contextmanager
def local_server(url: str | None, model: str, server_args: list[str] = (), start_timeout_s: float = 600,
                 stop_timeout_s: float = 60) -> Iterator[str]:
    """``url`` itself when given; otherwise the URL of a server on ``model`` with
    ``server_args``, once its ``/health`` answers 200."""
    if url:
        yield url.rstrip("/")
        return
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lmserve.frontends.cli", "serve", "api_server", model,
               "--server-name", "127.0.0.1", "--server-port", str(port), *server_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=stop_timeout_s)
