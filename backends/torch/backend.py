"""The torch backend: one engine thread that serves requests one at a time.

Each step lets a request's ``num_computed_tokens`` catch up with its
``num_tokens`` (prompt + output so far): a prompt is prefilled in chunks of
at most ``max_prefill_token_num`` tokens, then every step decodes one token.
Requests wait in FIFO order. (The paged, continuously batched engine of the
next issue replaces this loop behind the same :class:`Backend` interface.)
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from lmserve.backends.torch.kv_cache import KVCache
from lmserve.backends.torch.sampler import make_generator, sample
from lmserve.core.backend import Backend, OutputSink
from lmserve.core.types import EngineOutput, EngineRequest, FinishReason

logger = logging.getLogger(__name__)

_SUBMIT, _ABORT, _SHUTDOWN = "submit", "abort", "shutdown"


@dataclass
class _RequestState:
    """The engine's own mutable view of one request; nobody else sees it."""

    request: EngineRequest
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class TorchBackend(Backend):
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        *,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        device: torch.device,
        max_prefill_token_num: int = 1024,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self.max_prefill_token_num = max_prefill_token_num
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._running: _RequestState | None = None
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

    def warm_up(self) -> None:
        """One tiny forward pass, so the first request pays no first-call costs."""
        with torch.inference_mode():
            ids = torch.zeros(1, dtype=torch.long, device=self.device)
            hidden = self.model(ids, ids.clone(), self.kv_cache)
            self.model.compute_logits(hidden)
        self.kv_cache.reset()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                idle = self._running is None and not self._waiting
                if not self._handle_commands(block=idle):
                    return
                if self._running is None and self._waiting:
                    self._admit(self._waiting.popleft())
                if self._running is not None:
                    self._step()

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued submits and aborts; False once shutdown is asked."""
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == _SUBMIT:
                self._waiting.append(payload)
            elif kind == _ABORT:
                self._abort(payload)
            else:
                for request in self._waiting:
                    self._emit(EngineOutput(request.request_id, (), FinishReason.ABORT))
                self._waiting.clear()
                if self._running is not None:
                    self._finish(FinishReason.ABORT, ())
                return False

    def _abort(self, request_id: str) -> None:
        if self._running is not None and self._running.request.request_id == request_id:
            self._finish(FinishReason.ABORT, ())
            return
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                self._emit(EngineOutput(request_id, (), FinishReason.ABORT))
                return

    def _admit(self, request: EngineRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            self._emit(
                EngineOutput(
                    request.request_id, (), FinishReason.ERROR,
                    f"The prompt ({len(request.prompt_token_ids)} tokens) does not fit the "
                    f"context length ({self.max_model_len} tokens).",
                )
            )
            return
        # No reset: a request writes every cache row before it attends to it.
        self._running = _RequestState(
            request,
            make_generator(request.sampling_params, self.device),
            list(request.prompt_token_ids),
        )

    def _step(self) -> None:
        state = self._running
        assert state is not None
        start = state.num_computed_tokens
        end = min(len(state.token_ids), start + self.max_prefill_token_num)
        try:
            input_ids = torch.tensor(state.token_ids[start:end], dtype=torch.long, device=self.device)
            positions = torch.arange(start, end, dtype=torch.long, device=self.device)
            hidden = self.model(input_ids, positions, self.kv_cache)
            state.num_computed_tokens = end
            if end < len(state.token_ids):
                return  # more prompt chunks to prefill before sampling
            logits = self.model.compute_logits(hidden[-1:])[0]
            token_id = sample(logits, state.request.sampling_params, state.generator)
        except Exception as exc:  # a failed request must not kill the engine
            logger.exception("Request %s failed in the engine.", state.request.request_id)
            self._finish(FinishReason.ERROR, (), f"The engine failed: {type(exc).__name__}: {exc}")
            return
        state.token_ids.append(token_id)
        self._emit_or_finish(state, token_id)

    def _emit_or_finish(self, state: _RequestState, token_id: int) -> None:
        params = state.request.sampling_params
        if token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in self.eos_token_ids
        ):
            self._finish(FinishReason.STOP, (token_id,))
        elif state.num_output_tokens >= params.max_tokens or len(state.token_ids) >= self.max_model_len:
            self._finish(FinishReason.LENGTH, (token_id,))
        else:
            self._emit(EngineOutput(state.request.request_id, (token_id,)))

    def _finish(self, reason: FinishReason, token_ids: tuple[int, ...], error: str | None = None) -> None:
        state = self._running
        assert state is not None
        self._running = None
        self._emit(EngineOutput(state.request.request_id, token_ids, reason, error))

    def _emit(self, output: EngineOutput) -> None:
        assert self._sink is not None
        self._sink((output,))
