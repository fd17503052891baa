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
_MIN_REPETITION_PENALTY = 1e-30
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters and token history, as arrays.

    Off values: ``top_k`` 0, ``top_p`` 1, ``min_p`` 0, ``repetition_penalty``
    1, ``presence_penalty`` / ``frequency_penalty`` 0; ``temperature`` 0 is
    greedy. Row ``i``'s history is ``token_ids[token_offsets[i]:token_offsets[i
    + 1]]``: ``num_prompt_tokens[i]`` prompt tokens, then output tokens (rows
    without penalties may leave it empty). Its logit bias is the same CSR
    layout over ``bias_token_ids`` / ``bias_values`` (no duplicate ids).

    A row ``i`` with ``bitmask_rows[i] >= 0`` samples only the tokens its mask
    allows: bit ``j`` of word ``w`` of ``token_bitmask[bitmask_rows[i]]`` set
    means token ``32 * w + j`` is allowed (a structured output's grammar; the
    layout grammar engines fill). The mask applies before everything else.
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
    token_bitmask: np.ndarray  # int32 [M, ceil(V / 32)]
    bitmask_rows: np.ndarray  # int32 [B]: the row's mask, -1 for none

    @property
    def size(self) -> int:
        return len(self.temperature)

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams],
                      output_token_ids: Sequence[Sequence[int]],
                      prompt_token_ids: Sequence[Sequence[int]] | None = None,
                      seeds: Sequence[int | None] | None = None,
                      token_bitmask: np.ndarray | None = None,
                      bitmask_rows: np.ndarray | None = None) -> SamplingBatch:
        """Build a batch from each request's parameters and token ids.

        ``output_token_ids[i]`` are the tokens generated so far (their number
        is the row's step). History is copied only for rows with penalties,
        prompts only for rows with a repetition penalty (so
        ``prompt_token_ids`` may be None when no row has one). The seed is
        ``seeds[i]``, else ``params[i].seed``, else a fresh random one per call.
        ``token_bitmask`` / ``bitmask_rows``: the allowed tokens of constrained
        rows (see the class); None: no row is constrained.
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
                if name == "top_k":
                    column[i] = min(p.top_k, _INT32_MAX)  # > vocab: all
                else:  # a penalty past float32's range is its largest value, not inf (0 x inf is no number)
                    column[i] = min(getattr(p, name), _FLOAT32_MAX)
            if p.greedy or p.temperature < _GREEDY_EPS:
                columns["temperature"][i] = 0.0
            # A positive logit divided by a tiny penalty must stay finite.
            columns["repetition_penalty"][i] = max(columns["repetition_penalty"][i], _MIN_REPETITION_PENALTY)
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
        if (token_bitmask is None) != (bitmask_rows is None):
            raise ValueError("token_bitmask and bitmask_rows go together")
        if token_bitmask is None:
            token_bitmask, bitmask_rows = np.empty((0, 0), np.int32), np.full(size, -1, np.int32)
        return cls(**columns, seeds=seed_array, steps=steps, token_ids=token_ids,
                   token_offsets=token_offsets, num_prompt_tokens=num_prompt,
                   bias_token_ids=np.asarray(bias_ids, np.int32),
                   bias_values=np.asarray(bias_values, np.float32), bias_offsets=bias_offsets,
                   token_bitmask=token_bitmask, bitmask_rows=bitmask_rows)

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
            self._bitmask(),
            np.ascontiguousarray(self.bitmask_rows, np.int32),
        )

    def _bitmask(self) -> np.ndarray:
        """``token_bitmask`` as a contiguous int32 ``[M, W]`` with at least one element."""
        mask = np.ascontiguousarray(self.token_bitmask)
        if mask.dtype == np.uint32:
            mask = mask.view(np.int32)
        mask = np.ascontiguousarray(mask, np.int32)
        return mask if mask.size else np.zeros((1, 1), np.int32)


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


def _host_logits(logits) -> np.ndarray:
    array = np.asarray(logits)  # a CPU torch tensor becomes a zero-copy view
    if array.dtype != np.float32 or array.ndim != 2:
        raise ValueError(f"logits must be float32 [batch, vocab], got {array.dtype} {array.shape}")
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.ascontiguousarray(array)
    return array


def _check_batch(batch: SamplingBatch, rows: int, vocab_size: int) -> None:
    """Shapes, and token ids inside the vocabulary (the kernels index with them unchecked)."""
    if batch.size != rows:
        raise ValueError(f"the batch has {batch.size} rows but logits have {rows}")
    for name in ("bias_token_ids", "token_ids"):
        ids = getattr(batch, name)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside a vocabulary of {vocab_size}")
    rows_of_masks, mask = batch.bitmask_rows, batch.token_bitmask
    if rows_of_masks.shape != (rows,):
        raise ValueError(f"bitmask_rows has shape {rows_of_masks.shape}, not ({rows},)")
    if rows_of_masks.size and rows_of_masks.max() >= 0:
        if mask.ndim != 2 or mask.shape[1] < (vocab_size + 31) // 32:
            raise ValueError(f"token_bitmask has shape {mask.shape}: a row needs "
                             f"{(vocab_size + 31) // 32} words for a vocabulary of {vocab_size}")
        if rows_of_masks.min() < -1 or rows_of_masks.max() >= mask.shape[0]:
            raise ValueError(f"bitmask_rows holds rows outside a mask of {mask.shape[0]} rows")


def _token_counts(batch: SamplingBatch, rows: int, vocab_size: int,
                  workspace: SamplingWorkspace | None, device: bool):
    if batch.token_ids.size == 0:  # no penalties: never read
        return cuda.device_array((rows, 1), np.int32) if device else np.empty((rows, 1), np.int32)
    workspace = workspace or SamplingWorkspace()
    return workspace.get("token_counts", rows, vocab_size, np.int32, device)
