"""The paged KV cache copy kernels against torch indexing.

The CUDA kernels run under Numba's CUDA simulator in a subprocess (the
simulator is chosen when numba is first imported): this file doubles as that
subprocess's script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmserve.backends.torch.kernels.cache import gather_kv, gather_kv_batched, write_kv

BLOCK_SIZE, HEADS, HEAD_DIM, NUM_BLOCKS = 4, 3, 8, 12


def random_cache(rng, dtype=np.float32):
    shape = (NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def reference_write(cache, new, slot_mapping):
    out = torch.from_numpy(cache.copy()).view(-1, HEADS, HEAD_DIM)
    keep = torch.from_numpy(slot_mapping) >= 0
    out[torch.from_numpy(slot_mapping)[keep]] = torch.from_numpy(np.ascontiguousarray(new))[keep]
    return out.view(cache.shape).numpy()


def reference_gather(cache, block_table, context_len, max_len):
    positions = torch.arange(context_len)
    blocks = torch.from_numpy(np.asarray(block_table, np.int64))[positions // BLOCK_SIZE]
    out = torch.zeros((max_len, HEADS, HEAD_DIM), dtype=torch.from_numpy(cache).dtype)
    out[:context_len] = torch.from_numpy(cache)[blocks, positions % BLOCK_SIZE]
    return out.numpy()


# (block tables padded with -1, context lengths): empty, partial and full blocks
TABLES = np.array([[3, 7, 0, -1], [5, -1, -1, -1], [11, 2, 9, 4], [-1, -1, -1, -1]], np.int32)
CONTEXT_LENS = np.array([10, 3, 16, 0], np.int32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("parallel", [False, True])
def test_write_matches_torch_indexing(dtype, parallel):
    rng = np.random.default_rng(0)
    key_cache, value_cache = random_cache(rng, dtype)
    keys = rng.standard_normal((6, HEADS, HEAD_DIM)).astype(dtype)
    values = rng.standard_normal((6, HEADS, HEAD_DIM)).astype(dtype)
    slots = np.array([0, 13, -1, 47, 5, -1], np.int64)
    expected_keys = reference_write(key_cache, keys, slots)
    expected_values = reference_write(value_cache, values, slots)
    write_kv(key_cache, value_cache, keys, values, slots, parallel=parallel)
    np.testing.assert_array_equal(key_cache, expected_keys)
    np.testing.assert_array_equal(value_cache, expected_values)


def test_write_takes_bfloat16_tensors_and_strided_keys():
    key_cache = torch.zeros((NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    qkv = torch.randn(5, 3 * HEADS * HEAD_DIM).to(torch.bfloat16)  # keys are a strided slice
    keys = qkv[:, HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].view(5, HEADS, HEAD_DIM)
    values = qkv[:, 2 * HEADS * HEAD_DIM:].view(5, HEADS, HEAD_DIM)
    slots = np.array([8, 9, 10, -1, 30])
    write_kv(key_cache, value_cache, keys, values, slots)
    flat_keys, flat_values = key_cache.view(-1, HEADS, HEAD_DIM), value_cache.view(-1, HEADS, HEAD_DIM)
    assert torch.equal(flat_keys[[8, 9, 10, 30]], keys[[0, 1, 2, 4]])
    assert torch.equal(flat_values[[8, 9, 10, 30]], values[[0, 1, 2, 4]])
    assert flat_keys.float().abs().sum() == keys[[0, 1, 2, 4]].float().abs().sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("parallel", [False, True])
def test_gather_batched_matches_torch_indexing(dtype, parallel):
    rng = np.random.default_rng(1)
    key_cache, value_cache = random_cache(rng, dtype)
    max_len = 18  # not a multiple of the block size, longer than any context
    out_keys = rng.standard_normal((4, max_len, HEADS, HEAD_DIM)).astype(dtype)  # garbage
    out_values = out_keys.copy()
    gather_kv_batched(key_cache, value_cache, TABLES, CONTEXT_LENS, out_keys, out_values,
                      parallel=parallel)
    for i in range(4):
        np.testing.assert_array_equal(
            out_keys[i], reference_gather(key_cache, TABLES[i], CONTEXT_LENS[i], max_len))
        np.testing.assert_array_equal(
            out_values[i], reference_gather(value_cache, TABLES[i], CONTEXT_LENS[i], max_len))


def test_gather_one_sequence_into_tensors():
    rng = np.random.default_rng(2)
    key_cache, value_cache = (torch.from_numpy(c).to(torch.bfloat16) for c in random_cache(rng))
    out_keys = torch.full((10, HEADS, HEAD_DIM), 7.0, dtype=torch.bfloat16)
    out_values = out_keys.clone()
    gather_kv(key_cache, value_cache, [3, 7, 0], 10, out_keys, out_values)
    positions = torch.arange(10)
    blocks = torch.tensor([3, 7, 0])[positions // BLOCK_SIZE]
    assert torch.equal(out_keys, key_cache[blocks, positions % BLOCK_SIZE])
    assert torch.equal(out_values, value_cache[blocks, positions % BLOCK_SIZE])


def test_bad_shapes_and_indices_are_refused():
    rng = np.random.default_rng(3)
    key_cache, value_cache = random_cache(rng)
    keys = np.zeros((2, HEADS, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="outside a cache"):
        write_kv(key_cache, value_cache, keys, keys, np.array([0, NUM_BLOCKS * BLOCK_SIZE]))
    with pytest.raises(ValueError, match="does not match"):
        write_kv(key_cache, value_cache, keys.astype(np.float16), keys, np.array([0, 1]))
    out = np.zeros((4, 16, HEADS, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        gather_kv_batched(key_cache, value_cache, TABLES, CONTEXT_LENS + 1, out, out.copy())
    with pytest.raises(ValueError, match="outside a cache"):
        gather_kv_batched(key_cache, value_cache, TABLES + NUM_BLOCKS, CONTEXT_LENS, out, out.copy())
    transposed = np.zeros((4, HEADS, 16, HEAD_DIM), np.float32).transpose(0, 2, 1, 3)
    with pytest.raises(ValueError, match="contiguous"):
        gather_kv_batched(key_cache, value_cache, TABLES, CONTEXT_LENS, transposed, out)


# ---- the CUDA kernels ------------------------------------------------------------------------


def cuda_results(dtype) -> dict:
    """CPU and CUDA (whatever numba was imported as) results of a write then a gather."""
    from numba import cuda

    from lmserve.backends.torch.kernels.cache import gather_kv_batched_cuda, write_kv_cuda

    rng = np.random.default_rng(4)
    key_cache, value_cache = random_cache(rng, dtype)
    keys = rng.standard_normal((5, HEADS, HEAD_DIM)).astype(dtype)
    values = rng.standard_normal((5, HEADS, HEAD_DIM)).astype(dtype)
    slots = np.array([1, -1, 40, 41, 22])
    device_keys, device_values = cuda.to_device(key_cache), cuda.to_device(value_cache)
    write_kv(key_cache, value_cache, keys, values, slots)
    write_kv_cuda(device_keys, device_values, cuda.to_device(keys), cuda.to_device(values), slots,
                  threads=32)
    out = np.ones((4, 18, HEADS, HEAD_DIM), dtype)
    out_keys, out_values = cuda.to_device(out), cuda.to_device(out)
    gather_kv_batched(key_cache, value_cache, TABLES, CONTEXT_LENS, out, out.copy())
    gather_kv_batched_cuda(device_keys, device_values, TABLES, CONTEXT_LENS, out_keys, out_values,
                           threads=32)
    return {"cache": [device_keys.copy_to_host().tolist(), key_cache.tolist()],
            "gather": [out_keys.copy_to_host().tolist(), out.tolist()]}


def test_cuda_kernels_match_cpu_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for result in json.loads(run.stdout.strip().splitlines()[-1]):
        for got, expected in result.values():
            np.testing.assert_array_equal(got, expected)


def nvvm_available() -> bool:
    from numba.cuda.cudadrv import nvvm

    try:
        return nvvm.is_available()
    except Exception:  # noqa: BLE001 - any failure to load the toolkit means "no"
        return False


@pytest.mark.skipif(not nvvm_available(), reason="needs the CUDA toolkit's NVVM to compile")
@pytest.mark.parametrize("bits", [np.int16, np.int32])
def test_cuda_kernels_compile_for_a_gpu(bits):
    """The simulator runs the kernels as Python; NVVM compiles them as a GPU would."""
    import numba
    from numba import cuda

    from lmserve.backends.torch.kernels import cache

    slots, rows = np.zeros((8, 4), bits), np.zeros((2, 4), bits)
    write = (slots, slots, rows, rows, np.zeros(2, np.int64))
    gather = (slots, slots, TABLES, CONTEXT_LENS, np.zeros((4, 3, 4), bits),
              np.zeros((4, 3, 4), bits), BLOCK_SIZE)
    for kernel, args in ((cache._write_kernel, write), (cache._gather_kernel, gather)):
        ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(numba.typeof(a) for a in args), cc=(8, 0))
        assert ".entry" in ptx


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_cpu_on_a_gpu_with_bfloat16_tensors():
    from lmserve.backends.torch.kernels.cache import gather_kv_batched_cuda, write_kv_cuda

    for dtype in (np.float32, np.float16):
        for got, expected in cuda_results(dtype).values():
            np.testing.assert_array_equal(got, expected)
    rng = np.random.default_rng(5)
    key_cache, value_cache = (torch.from_numpy(c).to(torch.bfloat16) for c in random_cache(rng))
    keys = torch.randn(5, HEADS, HEAD_DIM).to(torch.bfloat16)
    slots = np.array([1, -1, 40, 41, 22])
    cuda_keys, cuda_values = key_cache.cuda(), value_cache.cuda()
    write_kv(key_cache, value_cache, keys, keys, slots)
    write_kv_cuda(cuda_keys, cuda_values, keys.cuda(), keys.cuda(), torch.from_numpy(slots).cuda())
    assert torch.equal(cuda_keys.cpu(), key_cache)
    out = torch.empty((4, 18, HEADS, HEAD_DIM), dtype=torch.bfloat16)
    cuda_out = out.cuda()
    gather_kv_batched(key_cache, value_cache, TABLES, CONTEXT_LENS, out, out.clone())
    gather_kv_batched_cuda(cuda_keys, cuda_values, torch.from_numpy(TABLES).cuda(),
                           torch.from_numpy(CONTEXT_LENS).cuda(), cuda_out, cuda_out.clone())
    torch.cuda.synchronize()
    assert torch.equal(cuda_out.cpu(), out)


if __name__ == "__main__":
    print(json.dumps([cuda_results(np.float32), cuda_results(np.float16)]))
