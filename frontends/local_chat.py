"""``lmserve chat MODEL``: chat in the terminal with a model this process loads (LMDeploy's ``lmdeploy chat``).

No server to start first: the command builds the same app ``lmserve serve
api_server`` would, serves it on a free loopback port from a thread of its own,
behind an API key made up for this run alone (so no other program on the machine
can use it), and chats with it there as ``lmserve serve api_client`` chats with a
server (:mod:`lmserve.frontends.terminal_chat`).
So a turn goes through exactly the code a server's turns go through (template,
sampling, the session's KV cache kept between turns), and the terminal keeps its
keys: an empty line sends, ``end`` starts a new session, ``exit`` quits, Ctrl-C
cancels a reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import pluggy
from sanic import Sanic

from lmserve.core.config import ServeConfig
from lmserve.frontends.api_client import APIClient
from lmserve.frontends.http.app import build_state, create_app
from lmserve.frontends.http.state import ServerState
from lmserve.frontends.terminal_chat import chat_in_terminal

#: Seconds the app gets to start listening once its weights have loaded.
START_TIMEOUT_S = 120.0


class BackgroundServer:
    """Serves a Sanic app on a free loopback port from a thread with its own event loop.

    Sanic's low-level server API, so the main thread keeps the terminal (and
    Ctrl-C): the app's listeners run as under ``app.run`` (the engine starts
    before it listens and stops after it closes).
    """

    def __init__(self, app: Sanic) -> None:
        self.app = app
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmserve-chat-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the model did not start serving within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the model could not start: {self._error}") from self._error

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); after it, the chat sees the socket gone
            self._error = exc
        finally:
            self._ready.set()
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await self.app.create_server(sock=self._socket, return_asyncio_server=True, access_log=False)
        await server.startup()
        await server.before_start()
        await server.after_start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.before_stop()
            server.close()
            await server.wait_closed()
            await server.after_stop()


def chat_locally(config: ServeConfig, pm: pluggy.PluginManager, session_id: int, stdin: TextIO,
                 stdout: TextIO, generation: Mapping[str, Any] | None = None) -> tuple[int, ServerState]:
    """Load ``config.model`` and chat with it until ``exit``: the exit status, and the state it ran on.

    ``generation``: each turn's arguments (as :func:`chat_in_terminal` takes them).
    """
    api_key = secrets.token_urlsafe(32)
    config = dataclasses.replace(config, options={**config.options, "api_keys": (api_key,)})
    state = build_state(config, pm)
    server = BackgroundServer(create_app(state, pm, announce=False))
    try:
        server.start()
        with APIClient(server.url, api_key=api_key) as api_client:
            status = chat_in_terminal(api_client, session_id, stdin, stdout, where=repr(state.model_name),
                                      generation=generation)
    finally:
        server.stop()
    return status, state
