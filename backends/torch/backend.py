"""The torch backend: the engine stepping in its own thread.

The event loop only enqueues commands (submit, abort, shutdown); the engine
thread applies them between steps, steps while there is work, and hands each
step's outputs to the bus in one call. HTTP stays responsive however busy the
engine is: torch releases the GIL inside its kernels.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from lmserve.backends.torch.engine import LLMEngine
from lmserve.core.backend import Backend, OutputSink
from lmserve.core.types import EngineOutput, EngineRequest

logger = logging.getLogger(__name__)

_SUBMIT, _ABORT, _SHUTDOWN = "submit", "abort", "shutdown"


class TorchBackend(Backend):
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.eos_token_ids = tuple(sorted(engine.eos_token_ids))
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._sink: OutputSink | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ Backend interface

    def start(self, sink: OutputSink) -> None:
        if self._thread is not None:
            raise RuntimeError("TorchBackend.start() called twice.")
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put((_SUBMIT, request))

    def abort(self, request_id: str) -> None:
        self._inbox.put((_ABORT, request_id))

    def shutdown(self) -> None:
        self._inbox.put((_SHUTDOWN, None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def describe(self) -> str:
        runner, blocks = self.engine.runner, self.engine.block_manager
        tokens = blocks.num_blocks * blocks.block_size
        return (
            f"torch engine on {runner.device}: KV cache {blocks.num_blocks} blocks x {blocks.block_size} "
            f"tokens ({tokens} tokens), context {self.max_model_len}, batch {self.engine.scheduler.max_batch_size}, "
            f"prefix caching {'on' if blocks.enable_prefix_caching else 'off'}"
        )

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    outputs: list[EngineOutput] = []
                    if not self._apply_commands(outputs, block=not self.engine.has_work):
                        self._emit(outputs + self.engine.abort_all())
                        return
                    if self.engine.has_work:
                        outputs.extend(self.engine.step())
                    self._emit(outputs)
        except BaseException:  # the engine is gone: fail everything, /health says 503
            logger.exception("The engine thread died.")
            self._emit(self.engine.abort_all())
            raise

    def _apply_commands(self, outputs: list[EngineOutput], block: bool) -> bool:
        """Apply queued submits and aborts; False once shutdown is asked."""
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == _SUBMIT:
                rejected = self.engine.add_request(payload)
                if rejected is not None:
                    outputs.append(rejected)
            elif kind == _ABORT:
                aborted = self.engine.abort_request(payload)
                if aborted is not None:
                    outputs.append(aborted)
            else:
                return False

    def _emit(self, outputs: list[EngineOutput]) -> None:
        if outputs:
            assert self._sink is not None
            self._sink(outputs)
