"""Paged key/value cache kernels: scatter new tokens into blocks, gather sequences back.

A layer's key (or value) cache is ``[num_blocks, block_size, num_kv_heads,
head_dim]``; a token's slot is ``block_id * block_size + offset``. Called
once per layer per forward pass: :func:`write_kv` stores the new tokens'
keys and values, :func:`gather_kv` / :func:`gather_kv_batched` copy
sequences into contiguous ``[context_len, num_kv_heads, head_dim]`` tensors
for attention. ``*_cuda`` twins take CUDA tensors or Numba device arrays.

Both kernels only move bits, so the launchers view every array as integers
of its element size: float32, float16 and bfloat16 (which Numba has no type
for) all work, as does any 1-, 2-, 4- or 8-byte dtype; the key/value arrays
of one call must share the cache's element size. Caches and outputs must
have contiguous ``(num_kv_heads, head_dim)`` rows (a torch tensor, a numpy
array or a device array); new keys/values may be strided.
"""

from __future__ import annotations

import math
import types

import numba
import numpy as np
from numba import cuda, njit, prange

_INT_OF_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
PARALLEL_MIN_BYTES = 4 << 20  # below this, waking Numba's threads costs more than it saves
_CUDA_THREADS = 128


def _compiled_twice(py_func):
    """Serial and parallel builds of one prange loop.

    The parallel one compiles a renamed copy: Numba's on-disk cache tells
    functions apart by name, not by compile flags.
    """
    twin = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_parallel")
    twin.__qualname__ = py_func.__qualname__ + "_parallel"
    return njit(cache=True)(py_func), njit(parallel=True, cache=True)(twin)


def _rows(array, leading: int, output: bool = False) -> np.ndarray:
    """A host array (or CPU torch tensor) as integers, shaped ``leading dims + [row]``.

    ``output``: the result must be a view (writes must land in ``array``).
    """
    if not isinstance(array, np.ndarray):  # a torch tensor: bfloat16 has no numpy dtype
        import torch

        array = array.view(getattr(torch, np.dtype(_INT_OF_SIZE[array.element_size()]).name)).numpy()
    array = array.view(_INT_OF_SIZE[array.dtype.itemsize])
    rows = array.reshape(array.shape[:leading] + (-1,))
    if output and not np.may_share_memory(rows, array):
        raise ValueError(f"an output of shape {array.shape} needs contiguous rows")
    return rows


def _slots(cache) -> np.ndarray:
    """A cache as ``[num_blocks * block_size, row]`` integers, a view."""
    rows = _rows(cache, 2, output=True)
    slots = rows.reshape(-1, rows.shape[-1])
    if not np.may_share_memory(slots, rows):
        raise ValueError(f"a cache of shape {rows.shape} needs contiguous blocks")
    return slots


def _check_compatible(key_cache, value_cache, *arrays) -> None:
    """Caches ``[blocks, block_size, *row]``; ``arrays``: ``(array, leading dims)`` pairs."""
    row, size = math.prod(key_cache.shape[2:]), key_cache.dtype.itemsize
    for array, leading in ((value_cache, 2), *arrays):
        if array.dtype.itemsize != size or math.prod(array.shape[leading:]) != row:
            raise ValueError(f"{array.dtype} {tuple(array.shape)} does not match a cache of "
                             f"{key_cache.dtype} {tuple(key_cache.shape)}")
    if tuple(value_cache.shape) != tuple(key_cache.shape):
        raise ValueError(f"key and value caches differ: {key_cache.shape}, {value_cache.shape}")


# ---- write -------------------------------------------------------------------------------


def _write_rows(key_slots, value_slots, keys, values, slot_mapping):
    for t in prange(slot_mapping.size):
        slot = slot_mapping[t]
        if slot >= 0:
            key_slots[slot, :] = keys[t, :]
            value_slots[slot, :] = values[t, :]


_write_rows_serial, _write_rows_parallel = _compiled_twice(_write_rows)


def write_kv(key_cache, value_cache, keys, values, slot_mapping, *,
             parallel: bool | None = None) -> None:
    """Store ``keys``/``values`` ``[T, num_kv_heads, head_dim]`` at ``slot_mapping`` (int64
    ``[T]``); a negative slot skips its token (padding). Host arrays or CPU tensors."""
    _check_compatible(key_cache, value_cache, (keys, 1), (values, 1))
    key_slots, value_slots = _slots(key_cache), _slots(value_cache)
    key_rows, value_rows = _rows(keys, 1), _rows(values, 1)
    slot_mapping = np.ascontiguousarray(slot_mapping, np.int64)
    if slot_mapping.size != key_rows.shape[0] or slot_mapping.size != value_rows.shape[0]:
        raise ValueError(f"{slot_mapping.size} slots for {key_rows.shape[0]} keys and "
                         f"{value_rows.shape[0]} values")
    if slot_mapping.size and slot_mapping.max() >= key_slots.shape[0]:
        raise ValueError(f"slot {slot_mapping.max()} is outside a cache of {key_slots.shape[0]}")
    if parallel is None:
        parallel = key_rows.nbytes * 2 >= PARALLEL_MIN_BYTES and numba.get_num_threads() > 1
    kernel = _write_rows_parallel if parallel else _write_rows_serial
    kernel(key_slots, value_slots, key_rows, value_rows, slot_mapping)


# ---- gather ------------------------------------------------------------------------------


def _gather_blocks(key_blocks, value_blocks, block_tables, context_lens, out_keys, out_values,
                   block_size, row):
    """Copy per (sequence, block): whole blocks are one contiguous run; zeros past the end."""
    num_seqs, max_len = out_keys.shape[0], out_keys.shape[1] // row
    blocks_per_seq = (max_len + block_size - 1) // block_size
    for job in prange(num_seqs * blocks_per_seq):
        seq, i = job // blocks_per_seq, job % blocks_per_seq
        start = i * block_size
        stop = min(start + block_size, max_len)
        n = min(max(context_lens[seq] - start, 0), stop - start)
        block = block_tables[seq, i] if i < block_tables.shape[1] else -1
        if block < 0:
            n = 0
        out_keys[seq, start * row:(start + n) * row] = key_blocks[block, :n * row]
        out_values[seq, start * row:(start + n) * row] = value_blocks[block, :n * row]
        out_keys[seq, (start + n) * row:stop * row] = 0
        out_values[seq, (start + n) * row:stop * row] = 0


_gather_blocks_serial, _gather_blocks_parallel = _compiled_twice(_gather_blocks)


def _check_tables(block_tables, context_lens, num_blocks, block_size, max_len):
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"{block_tables.shape[0]} block tables for {context_lens.shape[0]} lengths")
    if context_lens.size and context_lens.max() > min(max_len, block_tables.shape[1] * block_size):
        raise ValueError(f"a context of {context_lens.max()} tokens does not fit its block table "
                         f"({block_tables.shape[1]} blocks) or the output ({max_len} positions)")
    if block_tables.size and block_tables.max() >= num_blocks:
        raise ValueError(f"block {block_tables.max()} is outside a cache of {num_blocks} blocks")


def gather_kv_batched(key_cache, value_cache, block_tables, context_lens, out_keys, out_values, *,
                      parallel: bool | None = None) -> None:
    """Copy each sequence's first ``context_lens[i]`` tokens into ``out_keys[i]`` /
    ``out_values[i]`` (``[B, max_len, num_kv_heads, head_dim]``); later positions are zeroed.

    ``block_tables``: int32 ``[B, max_blocks]``, padded with -1.
    """
    _check_compatible(key_cache, value_cache, (out_keys, 2), (out_values, 2))
    key_blocks, value_blocks = _rows(key_cache, 1), _rows(value_cache, 1)
    block_size = key_cache.shape[1]
    key_out, value_out = _rows(out_keys, 1, True), _rows(out_values, 1, True)
    row = key_blocks.shape[1] // block_size
    block_tables = np.ascontiguousarray(block_tables, np.int32)
    context_lens = np.ascontiguousarray(context_lens, np.int32)
    _check_tables(block_tables, context_lens, key_blocks.shape[0], block_size,
                  key_out.shape[1] // row)
    if parallel is None:
        parallel = key_out.nbytes * 2 >= PARALLEL_MIN_BYTES and numba.get_num_threads() > 1
    kernel = _gather_blocks_parallel if parallel else _gather_blocks_serial
    kernel(key_blocks, value_blocks, block_tables, context_lens, key_out, value_out, block_size, row)


def gather_kv(key_cache, value_cache, block_table, context_len: int, out_keys, out_values, *,
              parallel: bool | None = None) -> None:
    """One sequence: its first ``context_len`` tokens into ``out_keys``/``out_values``
    (``[>= context_len, num_kv_heads, head_dim]``; positions past it are zeroed)."""
    gather_kv_batched(key_cache, value_cache, np.asarray(block_table, np.int32)[None],
                      np.array([context_len], np.int32), out_keys[None], out_values[None],
                      parallel=parallel)


# ---- CUDA --------------------------------------------------------------------------------


@cuda.jit
def _write_kernel(key_slots, value_slots, keys, values, slot_mapping):
    """Grid: x over a token's row elements, y over tokens (grid-stride)."""
    column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if column >= keys.shape[1]:
        return
    for t in range(cuda.blockIdx.y, slot_mapping.size, cuda.gridDim.y):
        slot = slot_mapping[t]
        if slot >= 0:
            key_slots[slot, column] = keys[t, column]
            value_slots[slot, column] = values[t, column]


@cuda.jit
def _gather_kernel(key_slots, value_slots, block_tables, context_lens, out_keys, out_values,
                   block_size):
    """Grid: x over row elements, y over (sequence, position) pairs (grid-stride)."""
    column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if column >= out_keys.shape[2]:
        return
    max_len = out_keys.shape[1]
    for pair in range(cuda.blockIdx.y, out_keys.shape[0] * max_len, cuda.gridDim.y):
        seq, position = pair // max_len, pair % max_len
        i = position // block_size
        block = block_tables[seq, i] if i < block_tables.shape[1] else -1
        if position < context_lens[seq] and block >= 0:
            slot = block * block_size + position % block_size
            out_keys[seq, position, column] = key_slots[slot, column]
            out_values[seq, position, column] = value_slots[slot, column]
        else:
            out_keys[seq, position, column] = 0
            out_values[seq, position, column] = 0


def _device_rows(array, leading: int):
    """A CUDA tensor or device array as integers of its element size, ``leading dims + [row]``."""
    if hasattr(array, "element_size"):  # torch
        import torch

        int_dtype = getattr(torch, np.dtype(_INT_OF_SIZE[array.element_size()]).name)
        array = cuda.as_cuda_array(array.view(int_dtype).reshape(*array.shape[:leading], -1))
        return array
    array = array.view(_INT_OF_SIZE[array.dtype.itemsize])
    return array.reshape(*array.shape[:leading], -1)


def _device_slots(cache):
    rows = _device_rows(cache, 2)
    return rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[2])


def _grid(row: int, pairs: int, threads: int) -> tuple[int, int]:
    return (row + threads - 1) // threads, max(1, min(pairs, 65535))


def write_kv_cuda(key_cache, value_cache, keys, values, slot_mapping, *, stream=0,
                  threads: int = _CUDA_THREADS) -> None:
    """:func:`write_kv` on the GPU; ``slot_mapping`` may be a host or device int64 array.

    Slots are not range-checked here (a check would cost a device sync).
    """
    _check_compatible(key_cache, value_cache, (keys, 1), (values, 1))
    key_slots, value_slots = _device_slots(key_cache), _device_slots(value_cache)
    key_rows, value_rows = _device_rows(keys, 1), _device_rows(values, 1)
    slots = slot_mapping
    if isinstance(slots, np.ndarray):
        slots = cuda.to_device(np.ascontiguousarray(slots, np.int64), stream=stream)
    elif hasattr(slots, "element_size"):
        slots = cuda.as_cuda_array(slots)
    if key_rows.shape[0]:
        _write_kernel[_grid(key_rows.shape[1], key_rows.shape[0], threads), threads, stream](
            key_slots, value_slots, key_rows, value_rows, slots)


def gather_kv_batched_cuda(key_cache, value_cache, block_tables, context_lens, out_keys,
                           out_values, *, stream=0, threads: int = _CUDA_THREADS) -> None:
    """:func:`gather_kv_batched` on the GPU (tables and lengths: host or device arrays)."""
    _check_compatible(key_cache, value_cache, (out_keys, 2), (out_values, 2))
    block_size = key_cache.shape[1]
    key_slots, value_slots = _device_slots(key_cache), _device_slots(value_cache)
    key_out, value_out = _device_rows(out_keys, 2), _device_rows(out_values, 2)
    if isinstance(block_tables, np.ndarray):
        _check_tables(block_tables, np.asarray(context_lens), key_cache.shape[0], block_size,
                      key_out.shape[1])
    tables, lens = block_tables, context_lens
    if isinstance(tables, np.ndarray):
        tables = cuda.to_device(np.ascontiguousarray(tables, np.int32), stream=stream)
    elif hasattr(tables, "element_size"):
        tables = cuda.as_cuda_array(tables)
    if isinstance(lens, np.ndarray):
        lens = cuda.to_device(np.ascontiguousarray(lens, np.int32), stream=stream)
    elif hasattr(lens, "element_size"):
        lens = cuda.as_cuda_array(lens)
    pairs = key_out.shape[0] * key_out.shape[1]
    if pairs:
        _gather_kernel[_grid(key_out.shape[2], pairs, threads), threads, stream](
            key_slots, value_slots, tables, lens, key_out, value_out, block_size)


def gather_kv_cuda(key_cache, value_cache, block_table, context_len: int, out_keys, out_values,
                   *, stream=0, threads: int = _CUDA_THREADS) -> None:
    """:func:`gather_kv` on the GPU (``block_table`` on the host)."""
    gather_kv_batched_cuda(key_cache, value_cache, np.asarray(block_table, np.int32)[None],
                           np.array([context_len], np.int32), out_keys[None], out_values[None],
                           stream=stream, threads=threads)


def warm_up(use_cuda: bool | None = None) -> None:
    """Compile (or load from the cache) the copy kernels for 2- and 4-byte elements."""
    for dtype in (np.float32, np.float16):
        cache = np.zeros((2, 4, 1, 2), dtype)
        new = np.ones((3, 1, 2), dtype)
        for parallel in (False, True):
            write_kv(cache, cache.copy(), new, new, np.array([0, -1, 5]), parallel=parallel)
            out = np.empty((1, 8, 1, 2), dtype)
            gather_kv_batched(cache, cache, np.array([[1, 0]]), np.array([6]), out, out.copy(),
                              parallel=parallel)
        if use_cuda or (use_cuda is None and cuda.is_available()):
            device_cache = cuda.to_device(cache)
            write_kv_cuda(device_cache, device_cache, cuda.to_device(new), cuda.to_device(new),
                          np.array([0, -1, 5]), threads=32)
            out = cuda.device_array((1, 8, 1, 2), dtype)
            gather_kv_batched_cuda(device_cache, device_cache, np.array([[1, 0]]), np.array([6]),
                                   out, out, threads=32)
