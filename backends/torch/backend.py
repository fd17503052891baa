"""The torch backend: the engine stepping in its own thread.

The event loop only enqueues commands (submit, abort, shutdown); the engine
thread applies them between steps, steps while there is work, and hands each
step's outputs to the bus in one call. HTTP stays responsive however busy the
engine is: torch releases the GIL inside its kernels.

The same thread also *builds* the engine (loads the weights, warms up): every
torch op of the backend then runs on one thread. OpenMP keeps one worker pool
per calling thread, and a second, idle pool left behind by a loading thread
costs a stepping thread about 30% of its speed on a small CPU (measured: 41 vs
58 tokens/s at batch 1 on 2 cores).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from lmserve.backends.torch.engine import LLMEngine
from lmserve.backends.torch.memory_trim import MemoryTrimmer
from lmserve.core.backend import Backend, BackendStats, OutputSink
from lmserve.core.types import EngineOutput, EngineRequest

logger = logging.getLogger(__name__)

_SUBMIT, _ABORT, _RELEASE, _SHUTDOWN = "submit", "abort", "release", "shutdown"


class TorchBackend(Backend):
    def __init__(self, build_engine: Callable[[], LLMEngine], on_fatal: Callable[[str], None] | None = None):
        """Start the engine thread, build the engine there with ``build_engine``
        and return once it is built (re-raising what the build raised). The
        thread steps only after :meth:`start`. ``on_fatal(message)`` is called (from
        another thread) if the engine can no longer step: its tensor-parallel group failed."""
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._sink: OutputSink | None = None
        self._started = threading.Event()
        built: queue.SimpleQueue[LLMEngine | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built),
                                        name="lmserve-engine", daemon=True)
        self._thread.start()
        result = built.get()
        if isinstance(result, BaseException):
            self._thread.join()
            raise result
        self.engine = result
        self.max_model_len = result.max_model_len
        self.eos_token_ids = tuple(sorted(result.eos_token_ids))
        self._on_fatal = on_fatal
        result.runner.parallel.on_failure(self._fail)
        self.memory_trimmer = MemoryTrimmer()

    def _fail(self, message: str) -> None:
        self.failure = message
        if self._on_fatal is not None:
            self._on_fatal(message)

    # ------------------------------------------------------------ Backend interface

    def start(self, sink: OutputSink) -> None:
        if self._started.is_set():
            raise RuntimeError("TorchBackend.start() called twice.")
        self._sink = sink
        self._started.set()
        self.memory_trimmer.start()

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put((_SUBMIT, request))

    def abort(self, request_id: str) -> None:
        self._inbox.put((_ABORT, request_id))

    def release_session(self, session_key: str) -> None:
        self._inbox.put((_RELEASE, session_key))

    def shutdown(self) -> None:
        self.memory_trimmer.stop()
        self._inbox.put((_SHUTDOWN, None))
        self._started.set()  # a backend shut down before start() stops too
        self._thread.join(timeout=30)

    def is_healthy(self) -> bool:
        return self._started.is_set() and self._thread.is_alive() and self.failure is None

    def stats(self) -> BackendStats:
        # Read from another thread without a lock: each value is one read of a
        # field the engine thread updates between steps.
        scheduler, blocks, runner = self.engine.scheduler, self.engine.block_manager, self.engine.runner
        return BackendStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=1.0 - blocks.num_free_blocks / blocks.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            num_kept_sessions=blocks.num_kept_sessions,
            kv_cache_written_bytes=blocks.num_blocks_ever_used * runner.kv_cache.block_bytes
            * runner.parallel.world_size,
        )

    def describe(self) -> str:
        runner, blocks = self.engine.runner, self.engine.block_manager
        tokens = blocks.num_blocks * blocks.block_size
        weights = f", {runner.weights}" if runner.weights else ""
        return (
            f"torch engine on {runner.device}{weights}: KV cache {blocks.num_blocks} blocks x {blocks.block_size} "
            f"tokens ({tokens} tokens), context {self.max_model_len}, batch {self.engine.scheduler.max_batch_size}, "
            f"prefix caching {'on' if blocks.enable_prefix_caching else 'off'}"
        )

    # ------------------------------------------------------------------ the loop

    def _run(self, build_engine: Callable[[], LLMEngine], built: queue.SimpleQueue) -> None:
        try:
            engine = build_engine()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.put(exc)
            return
        built.put(engine)
        self._started.wait()
        try:
            self._step_until_shutdown()
        finally:
            engine.runner.close()

    def _step_until_shutdown(self) -> None:
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
        """Apply queued commands in order; False once shutdown is asked."""
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
            elif kind == _RELEASE:
                self.engine.release_session(payload)
            else:
                return False

    def _emit(self, outputs: list[EngineOutput]) -> None:
        if outputs:
            assert self._sink is not None
            self._sink(outputs)
