"""The CUDA sampling kernel (Numba ``@cuda.jit``): one thread block per row.
What it computes: :mod:`.sampling`.

The twin of the CPU kernel (:mod:`.sampling_cpu`), from which it takes the
per-token rules both compile (penalties, the choice of a candidate level) and
their constants; tested against it and the reference under Numba's CUDA
simulator. Importing needs no GPU.

Where the CPU kernel sorts its candidates, a thread block finds each cut's last
token by the candidates' order keys (:mod:`.sampling_cuda_cuts`). The
probabilities go to a scratch row: the logits stay, as the order's keys.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from lmserve.backends.torch.kernels.random import uniform_cuda
from lmserve.backends.torch.kernels.sampling_cuda_cuts import (
    _KEY_END,
    _KEY_START,
    _MAX,
    _MIN,
    _SUM,
    _block_reduce,
    _in_prefix,
    _order_key,
    _prefix_cut,
    _prefix_measure,
)
from lmserve.backends.torch.kernels.sampling_batch import (
    SamplingBatch,
    SamplingWorkspace,
    _check_batch,
    _token_counts,
)
from lmserve.backends.torch.kernels.sampling_cpu import (
    _APPLIED_BIT,
    _COUNT_MASK,
    _LEVELS,
    _NUM_LEVELS,
    _PROMPT_BIT,
    _choose_level,
    _penalize,
)

_LEVEL_BITS = _LEVELS.view(np.int32)
_EXP_FLOOR = np.float32(-87.0)  # below it a probability is 0, as in the CPU kernel's exp
_MAX_THREADS = 256  # block size limit (a power of two); shared buffers are sized for it
_F64_SHARED = (_NUM_LEVELS + 2, _MAX_THREADS)  # level masses, the total, scan scratch
_I32_SHARED = (_NUM_LEVELS + 1, _MAX_THREADS)  # level counts, scratch

_penalize_cuda = cuda.jit(device=True)(_penalize)
_choose_level_cuda = cuda.jit(device=True)(_choose_level)


@cuda.jit(device=True)
def _penalize_row_cuda(x, row, bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                       token_ids, token_offsets, num_prompt_tokens, repetition, presence, frequency,
                       token_counts):
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    if bitmask_rows[row] >= 0:  # the constraint's mask first, as the CPU kernel
        words = token_bitmask[bitmask_rows[row]]
        for i in range(tid, x.size, threads):
            if not (words[i >> 5] >> (i & 31)) & 1:
                x[i] = -math.inf
        cuda.syncthreads()
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


@cuda.jit
def _sample_kernel(logits, logit_bits, temperature, top_p, top_k, min_p, repetition, presence,
                   frequency, seeds, steps, token_ids, token_offsets, num_prompt_tokens, bias_ids,
                   bias_values, bias_offsets, token_bitmask, bitmask_rows, token_counts, probs,
                   probs_bits, cand_p, cand_key, cand_id, out_tokens, out_logprobs):
    row = cuda.blockIdx.x
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    fbuf = cuda.shared.array(_F64_SHARED, types.float64)
    ibuf = cuda.shared.array(_I32_SHARED, types.int32)
    x, bits, p, p_bits = logits[row], logit_bits[row], probs[row], probs_bits[row]
    vocab_size = x.size
    if tid == 0:  # what a row of NaNs gets; the drawing thread overwrites it
        out_tokens[row] = 0
        out_logprobs[row] = math.nan
    _penalize_row_cuda(x, row, bias_ids, bias_values, bias_offsets, token_bitmask, bitmask_rows,
                       token_ids, token_offsets, num_prompt_tokens, repetition, presence, frequency,
                       token_counts)
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
        scaled = np.float32((x[i] - m) * inv_temperature)
        value = np.float32(math.exp(scaled)) if scaled > _EXP_FLOOR else np.float32(0.0)  # as the CPU's
        p[i] = value
        total += value
        for j in range(_NUM_LEVELS):
            if value >= _LEVELS[j]:
                level_counts[j] += 1
                level_masses[j] += value
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

    # the last kept token of the order, (key, id): top-k, top-p of those, min-p
    k, nucleus = top_k[row], top_p[row]
    k_on = 0 < k < vocab_size
    cut_key, cut_id = _KEY_START, vocab_size  # every token
    if k_on or nucleus < 1.0 or min_p[row] > 0.0:
        level = _choose_level_cuda(level_counts, level_masses, total, k, nucleus, min_p[row],
                                   vocab_size)
        floor = _LEVEL_BITS[level] if level >= 0 else 0  # p >= 0: bits order = value order
        # gather the candidates (any order: the cuts below only count and sum)
        if tid == 0:
            ibuf[0, 0] = 0
        cuda.syncthreads()
        row_p, row_key, row_id = cand_p[row], cand_key[row], cand_id[row]
        for i in range(tid, vocab_size, threads):
            if p_bits[i] >= floor:
                slot = cuda.atomic.add(ibuf, (0, 0), 1)
                row_p[slot] = p[i]
                row_key[slot] = _order_key(bits[i])
                row_id[slot] = i
        cuda.syncthreads()
        n = ibuf[0, 0]
        cuda.syncthreads()
        if k_on:
            cut_key, cut_id = _prefix_cut(row_p, row_key, row_id, n, cut_key, cut_id, k, False,
                                          vocab_size, fbuf[0], ibuf[0])
        if nucleus < 1.0:
            mass = total
            if k_on:
                mass = _prefix_measure(row_p, row_key, row_id, n, cut_key, cut_id, cut_key, cut_id,
                                       True, fbuf[0], ibuf[0])
            cut_key, cut_id = _prefix_cut(row_p, row_key, row_id, n, cut_key, cut_id, nucleus * mass,
                                          True, vocab_size, fbuf[0], ibuf[0])
        if min_p[row] > 0.0:  # the smallest key at least min_p as likely, all its ties
            least = _KEY_END - 1  # the most likely token is always among them
            for j in range(tid, n, threads):
                if row_p[j] >= min_p[row] and row_key[j] < least:
                    least = row_key[j]
            least = _block_reduce(ibuf[0], least, _MIN)
            if least > cut_key:
                cut_key, cut_id = least, vocab_size

    # inverse CDF in token order over the kept tokens: each thread owns a contiguous chunk
    chunk = (vocab_size + threads - 1) // threads
    begin = tid * chunk if tid * chunk < vocab_size else vocab_size
    stop = begin + chunk if begin + chunk < vocab_size else vocab_size
    chunk_mass = 0.0
    for i in range(begin, stop):
        if _in_prefix(_order_key(bits[i]), i, cut_key, cut_id):
            chunk_mass += p[i]
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
            if _in_prefix(_order_key(bits[i]), i, cut_key, cut_id) and p[i] > 0.0:
                cumulative += p[i]
                token = i
                if cumulative > target:
                    break
        out_tokens[row] = token
        out_logprobs[row] = math.log(p[token]) - math.log(mass)


# ---- launcher -----------------------------------------------------------------------------


def _device_array(array):
    """A numba device view of a torch CUDA tensor or a device array (the simulator's too)."""
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array)
    return array


def _cuda_kernel_args(logits, batch_args, token_counts, probs, candidates, candidate_keys, candidate_ids,
                      tokens, logprobs) -> tuple:
    """``_sample_kernel``'s arguments in order; float32 arrays are also passed as their bits."""
    return (logits, logits.view(np.int32), *batch_args, token_counts, probs, probs.view(np.int32),
            candidates, candidate_keys, candidate_ids, tokens, logprobs)


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
    scratch = [workspace.get(name, rows, vocab_size, dtype, device=True) for name, dtype in (
        ("probs", np.float32), ("candidates", np.float32), ("candidate_keys", np.int32),
        ("candidate_ids", np.int32))]
    tokens = cuda.device_array(rows, np.int64, stream=stream)
    logprobs = cuda.device_array(rows, np.float32, stream=stream)
    _sample_kernel[rows, threads, stream](*_cuda_kernel_args(logits, args, counts, *scratch, tokens, logprobs))
    return tokens.copy_to_host(stream=stream), logprobs.copy_to_host(stream=stream)
