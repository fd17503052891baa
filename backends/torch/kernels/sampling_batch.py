"""The sampling kernels' input, built on the host: one row per request.

:class:`SamplingBatch` holds each row's sampling parameters and token history
as flat arrays (CSR layouts for the variable-length parts), in the order the
kernels take them (:meth:`SamplingBatch.kernel_args`); :class:`SamplingWorkspace`
holds the scratch arrays both kernels reuse across steps. The launchers check a
batch against the logits (:func:`_check_batch`) before any kernel indexes with
its token ids unchecked.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import cuda

from lmserve.core.types import SamplingParams

_INT32_MAX = 2**31 - 1
_GREEDY_EPS = 1e-5  # temperatures below this sample greedily (as vLLM)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters and token history, as arrays.

    Off values: ``top_k`` 0, ``top_p`` 1, ``min_p`` 0, ``repetition_penalty``
    1, ``presence_penalty`` / ``frequency_penalty`` 0; ``temperature`` 0 is
    greedy. Row ``i``'s history is ``token_ids[token_offsets[i]:token_offsets[i
    + 1]]``: ``num_prompt_tokens[i]`` prompt tokens, then output tokens (rows
    without penalties may leave it empty). Its logit bias is the same CSR
    layout over ``bias_token_ids`` / ``bias_values`` (no duplicate ids).
    """

    temperature: np.ndarray  # float32 [B]
    top_p: np.ndarray  # float32 [B]
    top_k: np.ndarray  # int32 [B]
    min_p: np.ndarray  # float32 [B]
    repetition_penalty: np.ndarray  # float32 [B]
    presence_penalty: np.ndarray  # float32 [B]
    frequency_penalty: np.ndarray  # float32 [B]
    seeds: np.ndarray  # uint64 [B]
    steps: np.ndarray  # int64 [B]: tokens generated so far
    token_ids: np.ndarray  # int32 [N]
    token_offsets: np.ndarray  # int64 [B + 1]
    num_prompt_tokens: np.ndarray  # int32 [B]
    bias_token_ids: np.ndarray  # int32 [M]
    bias_values: np.ndarray  # float32 [M]
    bias_offsets: np.ndarray  # int64 [B + 1]

    @property
    def size(self) -> int:
        return len(self.temperature)

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams],
                      output_token_ids: Sequence[Sequence[int]],
                      prompt_token_ids: Sequence[Sequence[int]] | None = None,
                      seeds: Sequence[int | None] | None = None) -> SamplingBatch:
        """Build a batch from each request's parameters and token ids.

        ``output_token_ids[i]`` are the tokens generated so far (their number
        is the row's step). History is copied only for rows with penalties,
        prompts only for rows with a repetition penalty (so
        ``prompt_token_ids`` may be None when no row has one). The seed is
        ``seeds[i]``, else ``params[i].seed``, else a fresh random one per call.
        """
        size = len(params)
        columns = {name: np.empty(size, dtype) for name, dtype in (
            ("temperature", np.float32), ("top_p", np.float32), ("top_k", np.int32),
            ("min_p", np.float32), ("repetition_penalty", np.float32),
            ("presence_penalty", np.float32), ("frequency_penalty", np.float32))}
        seed_array = np.empty(size, np.uint64)
        steps = np.empty(size, np.int64)
        num_prompt = np.zeros(size, np.int32)
        histories: list[np.ndarray] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        token_offsets = np.zeros(size + 1, np.int64)
        bias_offsets = np.zeros(size + 1, np.int64)
        for i, p in enumerate(params):
            for name, column in columns.items():
                column[i] = getattr(p, name) if name != "top_k" else min(p.top_k, _INT32_MAX)  # > vocab: all
            if p.greedy or p.temperature < _GREEDY_EPS:
                columns["temperature"][i] = 0.0
            seed = seeds[i] if seeds is not None and seeds[i] is not None else p.seed
            seed_array[i] = (random.getrandbits(64) if seed is None else seed) & 0xFFFF_FFFF_FFFF_FFFF
            steps[i] = len(output_token_ids[i])
            count = 0
            if p.repetition_penalty != 1.0:
                if prompt_token_ids is None:
                    raise ValueError("a repetition penalty needs prompt_token_ids")
                histories.append(np.asarray(prompt_token_ids[i], np.int32))
                num_prompt[i] = count = len(histories[-1])
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                histories.append(np.asarray(output_token_ids[i], np.int32))
                count += len(histories[-1])
            token_offsets[i + 1] = token_offsets[i] + count
            bias_ids.extend(p.logit_bias.keys())
            bias_values.extend(p.logit_bias.values())
            bias_offsets[i + 1] = len(bias_ids)
        token_ids = np.concatenate(histories) if histories else np.empty(0, np.int32)
        return cls(**columns, seeds=seed_array, steps=steps, token_ids=token_ids,
                   token_offsets=token_offsets, num_prompt_tokens=num_prompt,
                   bias_token_ids=np.asarray(bias_ids, np.int32),
                   bias_values=np.asarray(bias_values, np.float32), bias_offsets=bias_offsets)

    def kernel_args(self) -> tuple[np.ndarray, ...]:
        """The arrays in kernel argument order, dtypes enforced (steps as uint64)."""
        return (
            np.ascontiguousarray(self.temperature, np.float32),
            np.ascontiguousarray(self.top_p, np.float32),
            np.ascontiguousarray(self.top_k, np.int32),
            np.ascontiguousarray(self.min_p, np.float32),
            np.ascontiguousarray(self.repetition_penalty, np.float32),
            np.ascontiguousarray(self.presence_penalty, np.float32),
            np.ascontiguousarray(self.frequency_penalty, np.float32),
            np.ascontiguousarray(self.seeds, np.uint64),
            np.ascontiguousarray(self.steps, np.int64).view(np.uint64),
            _nonempty(self.token_ids, np.int32),
            np.ascontiguousarray(self.token_offsets, np.int64),
            np.ascontiguousarray(self.num_prompt_tokens, np.int32),
            _nonempty(self.bias_token_ids, np.int32),
            _nonempty(self.bias_values, np.float32),
            np.ascontiguousarray(self.bias_offsets, np.int64),
        )


def _nonempty(array: np.ndarray, dtype) -> np.ndarray:
    """A contiguous copy-if-needed with at least one element (zero-size device arrays are awkward)."""
    array = np.ascontiguousarray(array, dtype)
    return array if array.size else np.zeros(1, dtype)


class SamplingWorkspace:
    """Scratch arrays the kernels reuse across steps; keep one per engine and device.

    Grown on demand to the largest batch seen; nothing in it outlives a call.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, object] = {}

    def get(self, name: str, rows: int, vocab_size: int, dtype, device: bool):
        array = self._arrays.get(name)
        if array is None or array.shape[0] < rows or array.shape[1] != vocab_size:
            shape = (rows, vocab_size)
            array = cuda.device_array(shape, dtype) if device else np.empty(shape, dtype)
            self._arrays[name] = array
        return array


def _check_batch(batch: SamplingBatch, rows: int, vocab_size: int) -> None:
    """Shapes, and token ids inside the vocabulary (the kernels index with them unchecked)."""
    if batch.size != rows:
        raise ValueError(f"the batch has {batch.size} rows but logits have {rows}")
    for name in ("bias_token_ids", "token_ids"):
        ids = getattr(batch, name)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside a vocabulary of {vocab_size}")


def _token_counts(batch: SamplingBatch, rows: int, vocab_size: int,
                  workspace: SamplingWorkspace | None, device: bool):
    if batch.token_ids.size == 0:  # no penalties: never read
        return cuda.device_array((rows, 1), np.int32) if device else np.empty((rows, 1), np.int32)
    workspace = workspace or SamplingWorkspace()
    return workspace.get("token_counts", rows, vocab_size, np.int32, device)
