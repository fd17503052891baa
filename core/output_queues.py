"""Engine outputs from the engine's thread to one asyncio queue per request."""

from __future__ import annotations

import asyncio
from typing import Sequence

from lmserve.core.types import EngineOutput


class OutputQueues:
    """One queue per request in flight, fed by a backend's sink from any thread.

    :meth:`bind` ties it to the event loop whose coroutines consume the queues;
    :meth:`sink` is the :data:`~lmserve.core.backend.OutputSink` to start a backend
    with (it hands each step's outputs to that loop, once per step); outputs of a
    request whose queue was closed (its consumer left) are dropped.
    """

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[EngineOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def bound(self) -> bool:
        return self._loop is not None

    def open(self, request_id: str) -> asyncio.Queue[EngineOutput]:
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        del self._queues[request_id]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._queues

    def __len__(self) -> int:
        return len(self._queues)

    def sink(self, outputs: Sequence[EngineOutput]) -> None:
        """Called from the engine's thread once per step."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._dispatch, outputs)
            except RuntimeError:  # the loop closed in between: shutting down
                pass

    def _dispatch(self, outputs: Sequence[EngineOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:  # None: the consumer already left
                queue.put_nowait(out)
