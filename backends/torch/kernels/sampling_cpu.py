"""The CPU sampling kernel (Numba ``@njit``): one row at a time, rows over
Numba's threads in large batches. What it computes, and its launchers: :mod:`.sampling`.

It is the reference for its CUDA twin (:mod:`.sampling_cuda`), which compiles
the two per-token rules written here once (:func:`_penalize`,
:func:`_choose_level`) and shares their constants. They live in this file
because Numba's on-disk cache is invalidated by a change to the file of the
function it compiled, not to the files that function calls into.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from lmserve.backends.torch.kernels.fastmath import FASTMATH, exp_nonpositive
from lmserve.backends.torch.kernels.random import uniform

# Probability levels (relative to the most likely token) for candidate sets.
_LEVELS = np.exp(-np.array([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 18.0])).astype(np.float32)
_NUM_LEVELS = len(_LEVELS)
# token_counts holds, per token of a row's history: output count | flags.
_PROMPT_BIT = 1 << 29
_APPLIED_BIT = 1 << 30
_COUNT_MASK = _PROMPT_BIT - 1
_SCAN_BLOCK = 1024
# Rows go over Numba's threads only with this many rows and threads: with few
# cores, the engine's other threads keep a worker waiting (milliseconds).
PARALLEL_MIN_ROWS = 16
PARALLEL_MIN_THREADS = 4
# A level is trusted to hold the top-p nucleus only with this much mass to spare
# (covers the rounding of the CPU kernel's float32 level sums).
_MASS_SLACK = 1.0 + 1e-4
#: What a penalised logit bottoms out at (:func:`_penalize`).
_LOWEST_LOGIT = np.float32(np.finfo(np.float32).min)


# ---- shared by both kernels (compiled for each) ------------------------------------------


def _penalize(x, token, count, repetition, presence, frequency):
    """Apply the penalties to one token seen in the history (``count`` output occurrences).

    A penalty makes a token less likely, never impossible (only a structured output's mask
    forbids one): a finite logit that an overflowing penalty would take to -inf, or to no
    number at all (0 x an infinite ``repetition_penalty``), becomes the lowest float32
    instead. Otherwise a row whose allowed tokens were all penalised would have nothing
    left to draw from."""
    value = x[token]
    if value == -np.inf:
        return
    if repetition != 1.0:
        value = value / repetition if value > 0 else value * repetition
    if count > 0:
        value = value - frequency * np.float32(count)
        value = value - presence
    if not value >= _LOWEST_LOGIT:  # -inf or NaN
        value = _LOWEST_LOGIT
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


# ---- the kernel ---------------------------------------------------------------------------


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
def _exp_sum(x, m):
    """The sum of ``exp(x[i] - m)`` (float64)."""
    total = 0.0
    for i in range(x.size):
        total += exp_nonpositive(x[i] - m)
    return total


@njit(fastmath=FASTMATH, cache=True)
def _exp_into(x, m, inv_temperature, out):
    """``out[i] = exp((x[i] - m) / T)``; returns the sum (float64)."""
    total = 0.0
    for i in range(x.size):
        p = exp_nonpositive((x[i] - m) * inv_temperature)
        out[i] = p
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
def _sum(p):
    total = 0.0
    for i in range(p.size):
        total += p[i]
    return total


@njit(cache=True)
def _candidate_ids(p, threshold, count):
    """The ids of the tokens with ``p >= threshold`` (``count`` of them), in id order,
    skipping blocks that hold none."""
    out = np.empty(count, np.int64)
    n = 0
    for start in range(0, p.size, 256):
        block = p[start:start + 256]
        if _count_at_least(block, threshold):
            for j in range(block.size):
                if block[j] >= threshold and n < count:
                    out[n] = start + j
                    n += 1
    return out[:n]


@njit(cache=True)
def _cut(x, p, candidates, total, top_k, top_p, min_p, vocab_size):
    """The kept tokens' ids, in id order: the shortest of the prefixes each cut keeps of
    the order (logit descending, lower id first among equal logits). Top-k keeps the
    first ``top_k``, top-p the shortest prefix of those whose mass reaches ``top_p`` of
    theirs, min-p those at least ``min_p`` as likely as the first. ``candidates``: ids
    in id order that hold the kept prefix."""
    order = candidates[np.argsort(-x[candidates], kind="mergesort")]  # stable: ties by id
    k_on = 0 < top_k < vocab_size
    kept = min(order.size, top_k) if k_on else order.size
    if top_p < 1.0:
        mass = total
        if k_on:
            mass = 0.0
            for j in range(kept):
                mass += p[order[j]]
        target = top_p * mass
        cumulative = 0.0
        for j in range(kept):
            cumulative += p[order[j]]
            if cumulative >= target:
                kept = j + 1
                break
    if min_p > 0.0:
        j = 1  # the first token has p == 1 >= min_p
        while j < kept and p[order[j]] >= min_p:
            j += 1
        kept = j
    return np.sort(order[:kept])


@njit(cache=True)
def _draw(p, u):
    """Inverse CDF in token order over every token; (token, log-probability)."""
    mass = _sum(p)
    target = u * mass
    cumulative = 0.0
    token = p.size - 1  # rounding fallback: the last token that has a probability
    for start in range(0, p.size, _SCAN_BLOCK):
        block = p[start:start + _SCAN_BLOCK]
        block_mass = _sum(block)
        if cumulative + block_mass <= target:
            cumulative += block_mass
            continue
        for j in range(block.size):
            if block[j] > 0.0:
                cumulative += block[j]
                token = start + j
                if cumulative > target:
                    break
        break
    while token > 0 and p[token] <= 0.0:
        token -= 1
    return token, math.log(p[token]) - math.log(mass)


@njit(cache=True)
def _draw_among(p, kept, u):
    """Inverse CDF in token order over the ``kept`` ids (in id order); (token, log-probability)."""
    mass = 0.0
    for token in kept:
        mass += p[token]
    target = u * mass
    cumulative = 0.0
    chosen = kept[0]
    for token in kept:
        if p[token] > 0.0:
            cumulative += p[token]
            chosen = token
            if cumulative > target:
                break
    return chosen, math.log(p[chosen]) - math.log(mass)


@njit(cache=True)
def _process_row(x, row, bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                 token_ids, token_offsets, num_prompt_tokens, repetition, presence, frequency,
                 token_counts):
    if bitmask_rows[row] >= 0:  # a structured output's mask: forbidden tokens become -inf
        words = token_bitmask[bitmask_rows[row]]
        for t in range(x.size):
            if not (words[t >> 5] >> (t & 31)) & 1:
                x[t] = -np.inf
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
def _support(x, p, temperature, top_k, top_p, min_p):
    """Write the unnormalised probabilities of processed logits ``x`` into ``p``; the
    kept ids in id order (:func:`_cut`), none when nothing cuts (every token is kept)."""
    m = _row_max(x)
    total = _exp_into(x, m, np.float32(1.0) / temperature, p)
    if not (0 < top_k < x.size or top_p < 1.0 or min_p > 0.0):
        return np.empty(0, np.int64)
    level_counts = np.empty(_NUM_LEVELS, np.int64)
    level_masses = np.empty(_NUM_LEVELS, np.float64)
    _level_stats(p, level_counts, level_masses)
    level = _choose_level_cpu(level_counts, level_masses, total, top_k, top_p, min_p, x.size)
    floor = _LEVELS[level] if level >= 0 else np.float32(0.0)
    count = level_counts[level] if level >= 0 else x.size
    return _cut(x, p, _candidate_ids(p, floor, count), total, top_k, top_p, min_p, x.size)


@njit(cache=True)
def _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence, frequency,
                seeds, steps, token_ids, token_offsets, num_prompt_tokens, bias_ids, bias_values,
                bias_offsets, token_bitmask, bitmask_rows, token_counts, probs, out_tokens, out_logprobs):
    x = logits[row]
    _process_row(x, row, bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                 token_ids, token_offsets, num_prompt_tokens, repetition, presence, frequency,
                 token_counts)
    if temperature[row] <= 0.0:
        m = _row_max(x)
        token = _first_index_of(x, m)
        out_tokens[row] = token
        out_logprobs[row] = -math.log(_exp_sum(x, m))
    else:
        p = probs[row]
        kept = _support(x, p, temperature[row], top_k[row], top_p[row], min_p[row])
        u = uniform(seeds[row], steps[row])
        token, logprob = _draw(p, u) if kept.size == 0 else _draw_among(p, kept, u)
        out_tokens[row] = token
        out_logprobs[row] = logprob


@njit(parallel=True, cache=True)
def _sample_rows_parallel(logits, temperature, top_p, top_k, min_p, repetition, presence,
                          frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                          bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                          token_counts, probs, out_tokens, out_logprobs):
    for row in prange(logits.shape[0]):
        _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence,
                    frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                    bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows, token_counts,
                    probs, out_tokens, out_logprobs)


@njit(cache=True)
def _sample_rows_serial(logits, temperature, top_p, top_k, min_p, repetition, presence,
                        frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                        bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                        token_counts, probs, out_tokens, out_logprobs):
    for row in range(logits.shape[0]):
        _sample_row(logits, row, temperature, top_p, top_k, min_p, repetition, presence,
                    frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens,
                    bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows, token_counts,
                    probs, out_tokens, out_logprobs)


@njit(cache=True)
def _penalize_rows(logits, repetition, presence, frequency, token_ids, token_offsets,
                   num_prompt_tokens, bias_ids, bias_values, bias_offsets, token_bitmask,
                   bitmask_rows, token_counts):
    for row in range(logits.shape[0]):
        _process_row(logits[row], row, bias_ids, bias_values, bias_offsets, token_bitmask,
                     bitmask_rows, token_ids, token_offsets, num_prompt_tokens, repetition,
                     presence, frequency, token_counts)


@njit(cache=True)
def _probs_rows(logits, temperature, top_p, top_k, min_p, out):
    for row in range(logits.shape[0]):
        x, p = logits[row], out[row]
        if temperature[row] <= 0.0:
            p[:] = 0.0
            p[_first_index_of(x, _row_max(x))] = 1.0
        else:
            kept = _support(x, p, temperature[row], top_k[row], top_p[row], min_p[row])
            if kept.size == 0:
                p /= _sum(p)
            else:
                mass = 0.0
                for token in kept:
                    mass += p[token]
                values = p[kept] / mass
                p[:] = 0.0
                p[kept] = values
