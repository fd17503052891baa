"""Batched token sampling: one row of logits per request, parameters per row.

The engine calls :func:`sample_cpu` or :func:`sample_cuda` once per step with
float32 logits ``[B, V]`` and a :class:`SamplingBatch`. Per row, as vLLM does:

1. logit bias is added; then the repetition penalty over every token seen in
   the prompt or the output (a positive logit is divided by it, any other
   multiplied); then the frequency and presence penalties over the output
   tokens (``logit -= frequency * count``, then ``logit -= presence``);
2. greedy rows (``temperature == 0``) take the argmax, the lowest id on ties;
3. other rows scale by ``1 / temperature``, softmax, then keep the top-k
   tokens, then the top-p nucleus of those (the fewest most likely tokens
   whose mass reaches ``top_p`` of the top-k mass), then drop every token
   less likely than ``min_p`` times the most likely one; one draw from the
   renormalised rest. Every cut is by value: tokens tied with the last one
   kept are kept too (as vLLM's top-k), so no cut depends on token order.

The uniform behind a draw is ``random.uniform(seed, step)`` (Philox): a
request's tokens do not depend on its batch, and the CPU and CUDA kernels draw
the same tokens from the same inputs (up to last-bit rounding differences at
a cut or a draw boundary). Both also return the log-probability of the chosen
token under the distribution it was drawn from (greedy rows: under the
softmax of the processed logits).

No full sort of the vocabulary: one pass counts the tokens and their mass
above a ladder of probability levels (``_LEVELS``); only the tokens above the
highest level that must contain the kept set are sorted (the CPU kernel) or
bisected on (the CUDA kernel). All tokens are candidates only as a fallback.

``logits`` is used as scratch and holds garbage after a call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import cuda, njit, prange, types

from lmserve.backends.torch.kernels.fastmath import FASTMATH, exp_nonpositive
from lmserve.backends.torch.kernels.random import uniform, uniform_cuda
from lmserve.core.types import SamplingParams

# Probability levels (relative to the most likely token) for candidate sets.
_LEVELS = np.exp(-np.array([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 18.0])).astype(np.float32)
_LEVEL_BITS = _LEVELS.view(np.int32)
_NUM_LEVELS = len(_LEVELS)
_ONE_BITS = int(np.float32(1.0).view(np.int32))
# token_counts holds, per token of a row's history: output count | flags.
_PROMPT_BIT = 1 << 29
_APPLIED_BIT = 1 << 30
_COUNT_MASK = _PROMPT_BIT - 1
_INT32_MAX = 2**31 - 1
_GREEDY_EPS = 1e-5  # temperatures below this sample greedily (as vLLM)
_SCAN_BLOCK = 1024
# Rows go over Numba's threads only with this many rows and threads: with few
# cores, the engine's other threads keep a worker waiting (milliseconds).
PARALLEL_MIN_ROWS = 16
PARALLEL_MIN_THREADS = 4
# A level is trusted to hold the top-p nucleus only with this much mass to spare
# (covers the rounding of the CPU kernel's float32 level sums).
_MASS_SLACK = 1.0 + 1e-4


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


# ---- shared by both kernels (compiled for each) ------------------------------------------


def _penalize(x, token, count, repetition, presence, frequency):
    """Apply the penalties to one token seen in the history (``count`` output occurrences)."""
    value = x[token]
    if repetition != 1.0:
        value = value / repetition if value > 0 else value * repetition
    if count > 0:
        value = value - frequency * np.float32(count)
        value = value - presence
    x[token] = value


def _choose_level(level_counts, level_masses, total, top_k, top_p, min_p, vocab_size):
    """The highest level whose tokens must contain the kept set, or -1 for all tokens."""
    k_on = 0 < top_k < vocab_size
    p_on = top_p < 1.0
    m_on = min_p > 0.0
    if not (k_on or p_on or m_on):
        return -1
    for j in range(_NUM_LEVELS):
        if k_on:
            # the top-p cut needs the whole top-k mass, so it must lie above the level
            if level_counts[j] >= top_k or (not p_on and m_on and min_p >= _LEVELS[j]):
                return j
        elif (p_on and level_masses[j] >= top_p * total * _MASS_SLACK) or (
                m_on and min_p >= _LEVELS[j]):
            return j
    return -1


_penalize_cpu = njit(cache=True)(_penalize)
_choose_level_cpu = njit(cache=True)(_choose_level)
_penalize_cuda = cuda.jit(device=True)(_penalize)
_choose_level_cuda = cuda.jit(device=True)(_choose_level)


# ---- CPU kernel ---------------------------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True)
def _row_max(x):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x[0]
    n8 = x.size // 8 * 8
    for i in range(0, n8, 8):  # eight chains: a single one does not vectorize
        a0 = max(a0, x[i])
        a1 = max(a1, x[i + 1])
        a2 = max(a2, x[i + 2])
        a3 = max(a3, x[i + 3])
        a4 = max(a4, x[i + 4])
        a5 = max(a5, x[i + 5])
        a6 = max(a6, x[i + 6])
        a7 = max(a7, x[i + 7])
    m = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
    for i in range(n8, x.size):
        m = max(m, x[i])
    return m


@njit(fastmath=FASTMATH, cache=True)
def _exp_in_place(x, m, inv_temperature):
    """``x[i] = exp((x[i] - m) / T)``; returns the sum (float64)."""
    total = 0.0
    for i in range(x.size):
        p = exp_nonpositive((x[i] - m) * inv_temperature)
        x[i] = p
        total += p
    return total


@njit(fastmath=FASTMATH, cache=True)
def _level_stats(p, counts, masses):
    """Count and sum the probabilities at or above each level (float32 sums: see _MASS_SLACK)."""
    l0, l1, l2, l3 = _LEVELS[0], _LEVELS[1], _LEVELS[2], _LEVELS[3]
    l4, l5, l6, l7 = _LEVELS[4], _LEVELS[5], _LEVELS[6], _LEVELS[7]
    zero = np.float32(0.0)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = np.int32(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    for i in range(p.size):
        v = p[i]
        c0 += np.int32(v >= l0); s0 += v if v >= l0 else zero  # noqa: E702
        c1 += np.int32(v >= l1); s1 += v if v >= l1 else zero  # noqa: E702
        c2 += np.int32(v >= l2); s2 += v if v >= l2 else zero  # noqa: E702
        c3 += np.int32(v >= l3); s3 += v if v >= l3 else zero  # noqa: E702
        c4 += np.int32(v >= l4); s4 += v if v >= l4 else zero  # noqa: E702
        c5 += np.int32(v >= l5); s5 += v if v >= l5 else zero  # noqa: E702
        c6 += np.int32(v >= l6); s6 += v if v >= l6 else zero  # noqa: E702
        c7 += np.int32(v >= l7); s7 += v if v >= l7 else zero  # noqa: E702
    counts[0], counts[1], counts[2], counts[3] = c0, c1, c2, c3
    counts[4], counts[5], counts[6], counts[7] = c4, c5, c6, c7
    masses[0], masses[1], masses[2], masses[3] = s0, s1, s2, s3
    masses[4], masses[5], masses[6], masses[7] = s4, s5, s6, s7


@njit(fastmath=FASTMATH, cache=True)
def _count_at_least(p, threshold):
    count = 0
    for i in range(p.size):
        count += np.int32(p[i] >= threshold)
    return count


@njit(cache=True)
def _first_index_of(x, value):
    """The first ``i`` with ``x[i] >= value`` (the argmax when ``value`` is the max)."""
    for start in range(0, x.size, 256):
        block = x[start:start + 256]
        if _count_at_least(block, value):
            for j in range(block.size):
                if block[j] >= value:
                    return start + j
    return 0


@njit(fastmath=FASTMATH, cache=True)
def _masked_sum(p, threshold):
    total = 0.0
    for i in range(p.size):
        total += p[i] if p[i] >= threshold else np.float32(0.0)
    return total


@njit(cache=True)
def _gather_at_least(p, threshold, count):
    """The values ``>= threshold`` (``count`` of them), skipping blocks that hold none."""
    out = np.empty(count, np.float32)
    n = 0
    for start in range(0, p.size, 256):
        block = p[start:start + 256]
        if _count_at_least(block, threshold):
            for v in block:
                if v >= threshold and n < count:
                    out[n] = v
                    n += 1
    return out[:n]


@njit(cache=True)
def _cut_threshold(candidates, total, floor, top_k, top_p, min_p, vocab_size):
    """The smallest kept probability: top-k, then top-p of those, then min-p (ties kept)."""
    threshold = floor
    n = candidates.size
    k_on = 0 < top_k < vocab_size
    if k_on or top_p < 1.0:
        s = np.sort(candidates)  # ascending: s[n - 1 - j] is the j-th most likely
        kept = n
        if k_on and top_k < n:
            threshold = max(threshold, s[n - top_k])
            kept = top_k
            while kept < n and s[n - 1 - kept] >= s[n - top_k]:
                kept += 1
        if top_p < 1.0:
            mass = total
            if k_on:
                mass = 0.0
                for j in range(kept):
                    mass += s[n - 1 - j]
            target = top_p * mass
            cumulative = 0.0
            for j in range(kept):
                cumulative += s[n - 1 - j]
                if cumulative >= target:
                    threshold = max(threshold, s[n - 1 - j])
                    break
    return max(threshold, min_p)


@njit(cache=True)
def _draw(p, threshold, u):
    """Inverse CDF in token order over the tokens ``>= threshold``; (token, log-probability)."""
    mass = _masked_sum(p, threshold)
    target = u * mass
    cumulative = 0.0
    token = 0
    for start in range(0, p.size, _SCAN_BLOCK):
        block = p[start:start + _SCAN_BLOCK]
        block_mass = _masked_sum(block, threshold)
        if block_mass <= 0.0:
            continue
        if cumulative + block_mass <= target:
            cumulative += block_mass
            token = start + block.size - 1  # rounding fallback: stay near the end
            continue
        for j in range(block.size):
            if block[j] >= threshold and block[j] > 0.0:
                cumulative += block[j]
                token = start + j
                if cumulative > target:
                    break
        break
    while token > 0 and (p[token] < threshold or p[token] <= 0.0):  # after a rounding fallback
        token -= 1
    return token, math.log(p[token]) - math.log(mass)


@njit(cache=True)
def _process_row(x, row, bias_ids, bias_values, bias_offsets, token_ids, token_offsets,
                 num_prompt_tokens, repetition, presence, frequency, token_counts):
    for j in range(bias_offsets[row], bias_offsets[row + 1]):
        x[bias_ids[j]] += bias_values[j]
    start, end = token_offsets[row], token_offsets[row + 1]
    counts = token_counts[row]
    for j in range(start, end):
        counts[token_ids[j]] = 0
    for j in range(start, end):
        if j < start + num_prompt_tokens[row]:
            counts[token_ids[j]] |= _PROMPT_BIT
        else:
            counts[token_ids[j]] += 1
    for j in range(start, end):
        c = counts[token_ids[j]]
        if not c & _APPLIED_BIT:
            counts[token_ids[j]] = c | _APPLIED_BIT
            _penalize_cpu(x, token_ids[j], c & _COUNT_MASK, repetition[row], presence[row],
                          frequency[row])


@njit(cache=True)
def _support(x, temperature, top_k, top_p, min_p):
    """Turn processed logits into unnormalised probabilities in place; the kept threshold."""
    m = _row_max(x)
    total = _exp_in_place(x, m, np.float32(1.0) / temperature)
    if not (0 < top_k < x.size or top_p < 1.0 or min_p > 0.0):
        return np.float32(0.0)
    level_counts = np.empty(_NUM_LEVELS, np.int64)
    level_masses = np.empty(_NUM_LEVELS, np.float64)
    _level_stats(x, level_counts, level_masses)
    level = _choose_level_cpu(level_counts, level_masses, total, top_k, top_p, min_p, x.size)
    floor = _LEVELS[level] if level >= 0 else np.float32(0.0)
    count = level_counts[level] if level >= 0 else x.size
    candidates = _gather_at_least(x, floor, count)
    return _cut_threshold(candidates, total, floor, top_k, top_p, min_p, x.size)


@njit(cache=True)
def _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence, frequency,
                seeds, steps, token_ids, token_offsets, num_prompt_tokens, bias_ids, bias_values,
                bias_offsets, token_counts, out_tokens, out_logprobs):
    x = logits[row]
    _process_row(x, row, bias_ids, bias_values, bias_offsets, token_ids, token_offsets,
                 num_prompt_tokens, repetition, presence, frequency, token_counts)
    if temperature[row] <= 0.0:
        m = _row_max(x)
        token = _first_index_of(x, m)
        out_tokens[row] = token
        out_logprobs[row] = -math.log(_exp_in_place(x, m, np.float32(1.0)))
    else:
        threshold = _support(x, temperature[row], top_k[row], top_p[row], min_p[row])
        token, logprob = _draw(x, threshold, uniform(seeds[row], steps[row]))
        out_tokens[row] = token
        out_logprobs[row] = logprob


@njit(parallel=True, cache=True)
def _sample_rows_parallel(logits, temperature, top_p, top_k, min_p, repetition, presence,
                          frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                          bias_ids, bias_values, bias_offsets, token_counts, out_tokens,
                          out_logprobs):
    for row in prange(logits.shape[0]):
        _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence,
                    frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                    bias_ids, bias_values, bias_offsets, token_counts, out_tokens, out_logprobs)


@njit(cache=True)
def _sample_rows_serial(logits, temperature, top_p, top_k, min_p, repetition, presence,
                        frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                        bias_ids, bias_values, bias_offsets, token_counts, out_tokens,
                        out_logprobs):
    for row in range(logits.shape[0]):
        _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence,
                    frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                    bias_ids, bias_values, bias_offsets, token_counts, out_tokens, out_logprobs)


@njit(cache=True)
def _penalize_rows(logits, repetition, presence, frequency, token_ids, token_offsets,
                   num_prompt_tokens, bias_ids, bias_values, bias_offsets, token_counts):
    for row in range(logits.shape[0]):
        _process_row(logits[row], row, bias_ids, bias_values, bias_offsets, token_ids,
                     token_offsets, num_prompt_tokens, repetition, presence, frequency,
                     token_counts)


@njit(cache=True)
def _probs_rows(logits, temperature, top_p, top_k, min_p, out):
    for row in range(logits.shape[0]):
        x = logits[row]
        out[row] = 0.0
        if temperature[row] <= 0.0:
            out[row, _first_index_of(x, _row_max(x))] = 1.0
        else:
            threshold = _support(x, temperature[row], top_k[row], top_p[row], min_p[row])
            mass = _masked_sum(x, threshold)
            for i in range(x.size):
                out[row, i] = x[i] / mass if x[i] >= threshold else 0.0


# ---- CUDA kernel: one block per row -------------------------------------------------------

_MAX_THREADS = 256  # block size limit (a power of two); shared buffers are sized for it
_F64_SHARED = (_NUM_LEVELS + 2, _MAX_THREADS)  # level masses, the total, scan scratch
_I32_SHARED = (_NUM_LEVELS + 1, _MAX_THREADS)  # level counts, scratch


_SUM, _MAX, _MIN = 0, 1, 2  # the reductions of _block_reduce


@cuda.jit(device=True)
def _block_reduce(buf, value, op):
    """``op`` (_SUM, _MAX or _MIN) of ``value`` over the block, for every thread;
    ``buf``: a shared row of its type. (A CUDA device function cannot take an
    operator, hence the code.)"""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = buf[tid + stride]
            if op == _SUM:
                buf[tid] += other
            elif (op == _MAX and other > buf[tid]) or (op == _MIN and other < buf[tid]):
                buf[tid] = other
        cuda.syncthreads()
        stride //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _penalize_row_cuda(x, row, bias_ids, bias_values, bias_offsets, token_ids, token_offsets,
                       num_prompt_tokens, repetition, presence, frequency, token_counts):
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    for j in range(bias_offsets[row] + tid, bias_offsets[row + 1], threads):
        x[bias_ids[j]] += bias_values[j]
    cuda.syncthreads()
    start, end = token_offsets[row], token_offsets[row + 1]
    if end > start:
        counts = token_counts[row]
        for j in range(start + tid, end, threads):
            counts[token_ids[j]] = 0
        cuda.syncthreads()
        for j in range(start + tid, end, threads):
            if j < start + num_prompt_tokens[row]:
                cuda.atomic.or_(counts, token_ids[j], _PROMPT_BIT)
            else:
                cuda.atomic.add(counts, token_ids[j], 1)
        cuda.syncthreads()
        for j in range(start + tid, end, threads):
            c = cuda.atomic.or_(counts, token_ids[j], _APPLIED_BIT)
            if not c & _APPLIED_BIT:
                _penalize_cuda(x, token_ids[j], c & _COUNT_MASK, repetition[row], presence[row],
                               frequency[row])
        cuda.syncthreads()


@cuda.jit(device=True)
def _bisect_cut(candidates, candidate_bits, n, low, goal, by_mass, fbuf, ibuf):
    """Largest threshold (as float bits) keeping ``goal`` candidates (or mass); ``low`` must."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    high = _ONE_BITS + 1
    while high - low > 1:
        mid = (low + high) // 2
        count = 0
        mass = 0.0
        for j in range(tid, n, threads):
            if candidate_bits[j] >= mid:
                count += 1
                mass += candidates[j]
        if by_mass:
            kept = _block_reduce(fbuf, mass, _SUM) >= goal
        else:
            kept = _block_reduce(ibuf, count, _SUM) >= goal
        if kept:
            low = mid
        else:
            high = mid
    return low


@cuda.jit
def _sample_kernel(logits, logit_bits, temperature, top_p, top_k, min_p, min_p_bits, repetition,
                   presence, frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                   bias_ids, bias_values, bias_offsets, token_counts, candidates, candidate_bits,
                   out_tokens, out_logprobs):
    row = cuda.blockIdx.x
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    fbuf = cuda.shared.array(_F64_SHARED, types.float64)
    ibuf = cuda.shared.array(_I32_SHARED, types.int32)
    x, bits = logits[row], logit_bits[row]
    vocab_size = x.size
    if tid == 0:  # what a row of NaNs gets; the drawing thread overwrites it
        out_tokens[row] = 0
        out_logprobs[row] = math.nan
    _penalize_row_cuda(x, row, bias_ids, bias_values, bias_offsets, token_ids, token_offsets,
                       num_prompt_tokens, repetition, presence, frequency, token_counts)
    local_max = -math.inf
    for i in range(tid, vocab_size, threads):
        if x[i] > local_max:
            local_max = x[i]
    m = np.float32(_block_reduce(fbuf[0], local_max, _MAX))

    if temperature[row] <= 0.0:  # greedy: the first maximum
        first = vocab_size
        for i in range(tid, vocab_size, threads):
            if x[i] == m:
                first = i
                break
        token = _block_reduce(ibuf[0], first, _MIN)
        total = 0.0
        for i in range(tid, vocab_size, threads):
            total += math.exp(x[i] - m)
        total = _block_reduce(fbuf[0], total, _SUM)
        if tid == 0:
            out_tokens[row] = token
            out_logprobs[row] = -math.log(total)
        return

    # probabilities relative to the most likely token, and the level statistics
    inv_temperature = np.float32(1.0) / temperature[row]
    level_counts = cuda.local.array(_NUM_LEVELS, types.int32)
    level_masses = cuda.local.array(_NUM_LEVELS, types.float64)
    for j in range(_NUM_LEVELS):
        level_counts[j] = 0
        level_masses[j] = 0.0
    total = 0.0
    for i in range(tid, vocab_size, threads):
        p = np.float32(math.exp((x[i] - m) * inv_temperature))
        x[i] = p
        total += p
        for j in range(_NUM_LEVELS):
            if p >= _LEVELS[j]:
                level_counts[j] += 1
                level_masses[j] += p
    for j in range(_NUM_LEVELS):
        fbuf[j, tid] = level_masses[j]
        ibuf[j, tid] = level_counts[j]
    fbuf[_NUM_LEVELS, tid] = total
    cuda.syncthreads()
    stride = threads // 2
    while stride > 0:
        if tid < stride:
            for j in range(_NUM_LEVELS + 1):
                fbuf[j, tid] += fbuf[j, tid + stride]
            for j in range(_NUM_LEVELS):
                ibuf[j, tid] += ibuf[j, tid + stride]
        cuda.syncthreads()
        stride //= 2
    for j in range(_NUM_LEVELS):
        level_counts[j] = ibuf[j, 0]
        level_masses[j] = fbuf[j, 0]
    total = fbuf[_NUM_LEVELS, 0]
    cuda.syncthreads()

    k, nucleus = top_k[row], top_p[row]
    k_on = 0 < k < vocab_size
    threshold = 0  # float bits of the smallest kept probability (p >= 0: bits order = value order)
    if k_on or nucleus < 1.0 or min_p[row] > 0.0:
        level = _choose_level_cuda(level_counts, level_masses, total, k, nucleus, min_p[row],
                                   vocab_size)
        threshold = _LEVEL_BITS[level] if level >= 0 else 0
        # gather the candidates (any order: the cuts below only count and sum)
        if tid == 0:
            ibuf[0, 0] = 0
        cuda.syncthreads()
        row_candidates, row_candidate_bits = candidates[row], candidate_bits[row]
        for i in range(tid, vocab_size, threads):
            if bits[i] >= threshold:
                row_candidates[cuda.atomic.add(ibuf, (0, 0), 1)] = x[i]
        cuda.syncthreads()
        n = ibuf[0, 0]
        cuda.syncthreads()
        if k_on:
            threshold = _bisect_cut(row_candidates, row_candidate_bits, n, threshold, k, False,
                                    fbuf[0], ibuf[0])
        if nucleus < 1.0:
            top_k_mass = total
            if k_on:
                top_k_mass = 0.0
                for j in range(tid, n, threads):
                    if row_candidate_bits[j] >= threshold:
                        top_k_mass += row_candidates[j]
                top_k_mass = _block_reduce(fbuf[0], top_k_mass, _SUM)
            threshold = _bisect_cut(row_candidates, row_candidate_bits, n, threshold,
                                    nucleus * top_k_mass, True, fbuf[0], ibuf[0])
        if min_p_bits[row] > threshold:
            threshold = min_p_bits[row]

    # inverse CDF in token order: each thread owns a contiguous chunk
    chunk = (vocab_size + threads - 1) // threads
    begin = tid * chunk if tid * chunk < vocab_size else vocab_size
    stop = begin + chunk if begin + chunk < vocab_size else vocab_size
    chunk_mass = 0.0
    for i in range(begin, stop):
        if bits[i] >= threshold:
            chunk_mass += x[i]
    fbuf[0, tid] = chunk_mass
    cuda.syncthreads()
    if tid == 0:
        running = 0.0
        last = 0
        for t in range(threads):
            fbuf[1, t] = running
            running += fbuf[0, t]
            if fbuf[0, t] > 0.0:
                last = t
        fbuf[2, 0] = running
        ibuf[0, 0] = last
    cuda.syncthreads()
    mass, prefix = fbuf[2, 0], fbuf[1, tid]
    target = uniform_cuda(seeds[row], steps[row]) * mass
    if chunk_mass > 0.0 and prefix <= target and (target < prefix + chunk_mass or tid == ibuf[0, 0]):
        cumulative = prefix
        token = begin
        for i in range(begin, stop):
            if bits[i] >= threshold and x[i] > 0.0:
                cumulative += x[i]
                token = i
                if cumulative > target:
                    break
        out_tokens[row] = token
        out_logprobs[row] = math.log(x[token]) - math.log(mass)


# ---- launchers ----------------------------------------------------------------------------


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


def _token_counts(batch: SamplingBatch, rows: int, vocab_size: int,
                  workspace: SamplingWorkspace | None, device: bool):
    if batch.token_ids.size == 0:  # no penalties: never read
        return cuda.device_array((rows, 1), np.int32) if device else np.empty((rows, 1), np.int32)
    workspace = workspace or SamplingWorkspace()
    return workspace.get("token_counts", rows, vocab_size, np.int32, device)


def sample_cpu(logits, batch: SamplingBatch, workspace: SamplingWorkspace | None = None, *,
               parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample one token per row of float32 ``logits`` ``[B, V]`` (numpy or a CPU tensor).

    Returns ``(token_ids int64 [B], logprobs float32 [B])``. ``logits`` is
    overwritten (scratch) when it is a C-contiguous writable float32 array.
    ``parallel``: rows over Numba's threads; None does so from
    ``PARALLEL_MIN_ROWS`` rows and ``PARALLEL_MIN_THREADS`` threads on.
    """
    logits = _host_logits(logits)
    rows, vocab_size = logits.shape
    _check_batch(batch, rows, vocab_size)
    tokens = np.empty(rows, np.int64)
    logprobs = np.empty(rows, np.float32)
    if rows == 0:
        return tokens, logprobs
    counts = _token_counts(batch, rows, vocab_size, workspace, device=False)
    if parallel is None:
        parallel = rows >= PARALLEL_MIN_ROWS and numba.get_num_threads() >= PARALLEL_MIN_THREADS
    kernel = _sample_rows_parallel if parallel else _sample_rows_serial
    kernel(logits, *batch.kernel_args(), counts, tokens, logprobs)
    return tokens, logprobs


def apply_penalties_cpu(logits, batch: SamplingBatch,
                        workspace: SamplingWorkspace | None = None) -> np.ndarray:
    """Add the logit bias and apply the penalties in place (the first stage of sampling)."""
    logits = _host_logits(logits)
    _check_batch(batch, *logits.shape)
    args = batch.kernel_args()
    counts = _token_counts(batch, logits.shape[0], logits.shape[1], workspace, device=False)
    _penalize_rows(logits, *args[4:7], *args[9:], counts)
    return logits


def sampling_probs_cpu(logits, batch: SamplingBatch,
                       workspace: SamplingWorkspace | None = None) -> np.ndarray:
    """The distribution each row's token is drawn from, float32 ``[B, V]`` (one-hot if greedy)."""
    logits = apply_penalties_cpu(logits, batch, workspace)
    args = batch.kernel_args()
    out = np.empty(logits.shape, np.float32)
    _probs_rows(logits, args[0], args[1], args[2], args[3], out)
    return out


def _device_array(array):
    """A numba device view of a torch CUDA tensor or a device array (the simulator's too)."""
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array)
    return array


def _cuda_kernel_args(logits, batch_args, token_counts, candidates, tokens, logprobs) -> tuple:
    """``_sample_kernel``'s arguments in order; float32 arrays are also passed as their bits."""
    return (logits, logits.view(np.int32), *batch_args[:4], batch_args[3].view(np.int32),
            *batch_args[4:], token_counts, candidates, candidates.view(np.int32), tokens, logprobs)


def sample_cuda(logits, batch: SamplingBatch, workspace: SamplingWorkspace | None = None, *,
                threads: int = _MAX_THREADS, stream=0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_cpu` on the GPU: ``logits`` is a float32 ``[B, V]`` CUDA tensor or
    device array (C-contiguous; overwritten). Returns host arrays.

    ``stream``: a numba stream; for torch's current stream pass
    ``cuda.external_stream(torch.cuda.current_stream().cuda_stream)``.
    """
    if threads > _MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two <= {_MAX_THREADS}, got {threads}")
    logits = _device_array(logits)
    if logits.dtype != np.float32 or len(logits.shape) != 2:
        raise ValueError(f"logits must be float32 [batch, vocab], got {logits.dtype} {logits.shape}")
    rows, vocab_size = logits.shape
    _check_batch(batch, rows, vocab_size)
    if rows == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    args = [cuda.to_device(a, stream=stream) for a in batch.kernel_args()]
    workspace = workspace or SamplingWorkspace()
    counts = _token_counts(batch, rows, vocab_size, workspace, device=True)
    candidates = workspace.get("candidates", rows, vocab_size, np.float32, device=True)
    tokens = cuda.device_array(rows, np.int64, stream=stream)
    logprobs = cuda.device_array(rows, np.float32, stream=stream)
    _sample_kernel[rows, threads, stream](
        *_cuda_kernel_args(logits, args, counts, candidates, tokens, logprobs))
    return tokens.copy_to_host(stream=stream), logprobs.copy_to_host(stream=stream)


def warm_up(use_cuda: bool | None = None) -> None:
    """Compile (or load from the cache) every sampling kernel on tiny inputs.

    Call before the server reports ready. ``use_cuda``: None compiles the
    CUDA kernel when a GPU (or the simulator) is available.
    """

    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.05, seed=0,
                             repetition_penalty=1.2, presence_penalty=0.5,
                             frequency_penalty=0.5, logit_bias={1: 2.0})]
    batch = SamplingBatch.from_requests(params, [[1, 2], [3]], [[4], [5, 6]])
    logits = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    sample_cpu(logits.copy(), batch, parallel=False)
    sample_cpu(logits.copy(), batch, parallel=True)
    sampling_probs_cpu(logits.copy(), batch)
    if use_cuda or (use_cuda is None and cuda.is_available()):
        sample_cuda(cuda.to_device(logits), batch, threads=32)
