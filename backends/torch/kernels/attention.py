"""Decode attention that reads the paged KV cache in place (the CPU's decode path).

One new token per sequence attends over its whole context, block by block,
straight from the cache: no gather into a padded copy, no mask, each
sequence only as long as its own context. Per (sequence, kv head) the query
group (the heads sharing that kv head) is scored against one block of keys,
folded into a running softmax (the "online softmax" of FlashAttention), and
the block's values are accumulated; jobs run in parallel over Numba's threads.

Caches are one layer's ``[kv_heads * blocks_per_head, block_size, head_dim]``
blocks, heads-major (kv head ``h``'s copy of block ``b`` is row
``h * blocks_per_head + b``), in float32 or bfloat16; bfloat16 is passed as
its ``uint16`` bits (numpy has no bfloat16) and widened in registers.
Arithmetic is float32.

CPU only: on CUDA the engine gathers and calls torch's fused
``scaled_dot_product_attention`` instead, so there is no ``@cuda.jit`` twin.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from lmserve.backends.torch.kernels.fastmath import FASTMATH, exp_nonpositive

#: Cache element types the kernel reads: float32, and bfloat16 as its uint16 bits.
CACHE_DTYPES = (np.float32, np.uint16)
_LOWEST = np.float32(-3.0e38)  # running max before any key (finite: no inf arithmetic)


@intrinsic
def _widen(typingctx, value):
    """A cache element as float32: float32 as is, uint16 as bfloat16 bits."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, signature, args: args[0]

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.uint16), codegen


@functools.cache
def _kernel(group: int, head_dim: int):
    """The kernel for one query-group size and head size, compiled on first use.

    Constant loop bounds let the compiler keep a query group in registers and
    share each key's load across the group (15-25% faster than runtime bounds).
    Numba's on-disk cache tells the compiled closures apart by their constants.
    """

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def decode_attention_kernel(query, new_keys, new_values, write_rows, key_blocks, value_blocks, block_tables,
                                context_lens, window, scale, softcap, out):
        num_seqs, num_kv_heads = query.shape[0], query.shape[1]
        block_size = key_blocks.shape[1]
        blocks_per_head = key_blocks.shape[0] // num_kv_heads
        store = write_rows.shape[0] > 0
        for job in prange(num_seqs * num_kv_heads):
            seq, head = job // num_kv_heads, job % num_kv_heads
            if store:  # this job's own new key/value first: its context ends with it
                row = write_rows[head * num_seqs + seq]
                for d in range(head_dim):
                    key_blocks[row // block_size, row % block_size, d] = new_keys[seq, head, d]
                    value_blocks[row // block_size, row % block_size, d] = new_values[seq, head, d]
            q = np.empty((group, head_dim), np.float32)
            for g in range(group):
                for d in range(head_dim):
                    q[g, d] = _widen(query[seq, head, g, d]) * scale
            scores = np.empty((group, block_size), np.float32)
            running_max = np.full(group, _LOWEST, np.float32)
            running_sum = np.zeros(group, np.float32)
            acc = np.zeros((group, head_dim), np.float32)
            end = context_lens[seq]
            start = max(0, end - window) if window > 0 else 0
            for b in range(start // block_size, (end + block_size - 1) // block_size):
                first = max(start - b * block_size, 0)
                last = min(end - b * block_size, block_size)
                row = head * blocks_per_head + block_tables[seq, b]
                keys, values = key_blocks[row], value_blocks[row]
                for t in range(first, last):
                    for g in range(group):
                        s = np.float32(0.0)
                        for d in range(head_dim):
                            s += q[g, d] * _widen(keys[t, d])
                        if softcap > 0:
                            s = softcap * np.tanh(s / softcap)
                        scores[g, t] = s
                for g in range(group):
                    new_max = running_max[g]
                    for t in range(first, last):
                        new_max = max(new_max, scores[g, t])
                    rescale = exp_nonpositive(running_max[g] - new_max)
                    running_max[g] = new_max
                    total = running_sum[g] * rescale
                    for d in range(head_dim):
                        acc[g, d] *= rescale
                    for t in range(first, last):
                        p = exp_nonpositive(scores[g, t] - new_max)
                        scores[g, t] = p
                        total += p
                    running_sum[g] = total
                for t in range(first, last):
                    for g in range(group):
                        p = scores[g, t]
                        for d in range(head_dim):
                            acc[g, d] += p * _widen(values[t, d])
            for g in range(group):
                inverse = np.float32(1.0) / running_sum[g]
                for d in range(head_dim):
                    out[seq, head, g, d] = acc[g, d] * inverse

    return decode_attention_kernel


def decode_attention(query: np.ndarray, key_blocks: np.ndarray, value_blocks: np.ndarray,
                     block_tables: np.ndarray, context_lens: np.ndarray, out: np.ndarray, *,
                     window: int = 0, scale: float | None = None, softcap: float = 0.0) -> None:
    """Attend one query token per sequence over its cached context; writes ``out``.

    ``query``, ``out``: float32 ``[num_seqs, kv_heads, group, head_dim]``
    (query heads grouped by the kv head they share). ``key_blocks``,
    ``value_blocks``: ``[kv_heads * blocks_per_head, block_size, head_dim]``,
    float32 or uint16 (bfloat16 bits). ``block_tables``: int64 ``[num_seqs,
    >= blocks used]``; ``context_lens``: int64 ``[num_seqs]``, each >= 1 (the
    query's own key must be in the cache already). ``window`` > 0: attend only
    to the last ``window`` positions. ``scale`` defaults to ``head_dim ** -0.5``.
    ``softcap`` > 0: scores pass through ``softcap * tanh(score / softcap)`` (Gemma 2).
    """
    num_seqs, num_kv_heads, _, head_dim = query.shape
    if key_blocks.dtype not in CACHE_DTYPES or value_blocks.dtype != key_blocks.dtype:
        raise TypeError(f"caches must be float32 or uint16 (bfloat16 bits), got {key_blocks.dtype}, "
                        f"{value_blocks.dtype}")
    if query.dtype != np.float32 or out.dtype != np.float32 or out.shape != query.shape:
        raise TypeError("query and out must be float32 arrays of the same shape")
    if key_blocks.shape[0] % num_kv_heads or key_blocks.shape[2] != head_dim:
        raise ValueError(f"caches of shape {key_blocks.shape} do not hold {num_kv_heads} kv heads of {head_dim}")
    if len(context_lens) != num_seqs or (num_seqs and context_lens.min() < 1):
        raise ValueError("need one context length >= 1 per sequence")
    if num_seqs and -(-int(context_lens.max()) // key_blocks.shape[1]) > block_tables.shape[1]:
        raise ValueError("a block table is shorter than its context")
    nothing = np.empty((0, 0, 0), key_blocks.dtype)
    store_and_decode_attention(query, nothing, nothing, np.empty(0, np.int64), key_blocks, value_blocks,
                               block_tables, context_lens, out, window=window, scale=scale, softcap=softcap)


def store_and_decode_attention(query: np.ndarray, new_keys: np.ndarray, new_values: np.ndarray,
                               write_rows: np.ndarray, key_blocks: np.ndarray, value_blocks: np.ndarray,
                               block_tables: np.ndarray, context_lens: np.ndarray, out: np.ndarray, *,
                               window: int = 0, scale: float | None = None, softcap: float = 0.0) -> None:
    """:func:`decode_attention` that first stores each sequence's new key and value,
    in one pass (the decode step's path), without its argument checks.

    ``query`` may also be uint16 (bfloat16 bits). ``new_keys``, ``new_values``: ``[num_seqs,
    kv_heads, head_dim]`` of the caches' element type; ``write_rows``: int64 ``[kv_heads *
    num_seqs]``, kv head ``h``'s row (``block * block_size + offset`` in the caches' flat
    view) for sequence ``i`` at ``h * num_seqs + i``; empty to store nothing.
    """
    head_dim = query.shape[3]
    kernel = _kernel(query.shape[2], head_dim)
    kernel(query, new_keys, new_values, write_rows, key_blocks, value_blocks, block_tables, context_lens, window,
           np.float32(head_dim**-0.5 if scale is None else scale), np.float32(softcap), out)
