"""Micro-benchmark of the Numba kernels on the CPU: prints a table of per-call times.

    python loadtests/bench_kernels.py [--vocab 49152] [--repeat 50]

Sampling: one engine step for B rows of a V-token vocabulary, logits ~ N(0, 3^2)
(penalised rows: a 500-token prompt and 100 output tokens); the input copy and
the batch building are not timed. Cache: one layer's call
(keys and values) at B=64, ctx=512, 3 KV heads x 64, block size 64.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from lmserve.backends.torch.kernels import cache, sampling, warm_up
from lmserve.core.types import SamplingParams


SAMPLING_CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "t=1.0": SamplingParams(temperature=1.0),
    "t=0.7 top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "t=0.7 top_p=0.9 top_k=40": SamplingParams(temperature=0.7, top_p=0.9, top_k=40),
    "t=0.7 top_p=0.9 rep=1.1 freq=0.1": SamplingParams(temperature=0.7, top_p=0.9,
                                                       repetition_penalty=1.1,
                                                       frequency_penalty=0.1),
}


def time_call(function, prepare, repeat: int) -> float:
    """Median seconds of ``function(*prepare())``; ``prepare`` is not timed."""
    times = []
    for _ in range(repeat):
        args = prepare()
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_sampling(vocab_size: int, repeat: int, parallel: bool | None) -> None:
    rng = np.random.default_rng(0)
    print(f"sampling, V={vocab_size}, {numba.get_num_threads()} threads, parallel={parallel}")
    print(f"{'case':34s} {'B=1':>9s} {'B=8':>9s} {'B=64':>9s} {'B=256':>9s}")
    workspace = sampling.SamplingWorkspace()
    for name, params in SAMPLING_CASES.items():
        row = []
        for size in (1, 8, 64, 256):
            logits = (rng.standard_normal((size, vocab_size)) * 3).astype(np.float32)
            history = [rng.integers(0, vocab_size, 500), rng.integers(0, vocab_size, 100)]
            batch = sampling.SamplingBatch.from_requests(
                [params] * size, [history[1]] * size, [history[0]] * size,
                seeds=list(range(size)))
            seconds = time_call(
                lambda x: sampling.sample_cpu(x, batch, workspace, parallel=parallel),
                lambda: (logits.copy(),), repeat)
            row.append(f"{seconds * 1e3:7.3f}ms")
        print(f"{name:34s} " + " ".join(f"{cell:>9s}" for cell in row))


def bench_cache(repeat: int, parallel: bool | None) -> None:
    seqs, context, heads, head_dim, block_size = 64, 512, 3, 64, 64
    blocks_per_seq = context // block_size
    rng = np.random.default_rng(1)
    shape = (seqs * blocks_per_seq + 8, block_size, heads, head_dim)
    key_cache = rng.standard_normal(shape).astype(np.float32)
    value_cache = key_cache.copy()
    tables = rng.permutation(shape[0])[: seqs * blocks_per_seq].reshape(seqs, -1).astype(np.int32)
    lens = np.full(seqs, context, np.int32)
    out_keys = np.empty((seqs, context, heads, head_dim), np.float32)
    out_values = np.empty_like(out_keys)
    moved = 2 * out_keys.nbytes
    gather = time_call(lambda: cache.gather_kv_batched(
        key_cache, value_cache, tables, lens, out_keys, out_values, parallel=parallel),
        lambda: (), repeat)
    decode_slots = (tables[:, -1].astype(np.int64) * block_size + block_size - 1)
    new = rng.standard_normal((seqs, heads, head_dim)).astype(np.float32)
    decode = time_call(lambda: cache.write_kv(key_cache, value_cache, new, new, decode_slots,
                                              parallel=parallel), lambda: (), repeat)
    prefill_slots = (tables[:4].astype(np.int64)[:, :, None] * block_size
                     + np.arange(block_size)).reshape(-1)  # 4 prompts of 512 tokens
    prefill_new = rng.standard_normal((prefill_slots.size, heads, head_dim)).astype(np.float32)
    prefill = time_call(lambda: cache.write_kv(key_cache, value_cache, prefill_new, prefill_new,
                                               prefill_slots, parallel=parallel),
                        lambda: (), repeat)
    print(f"\npaged cache (one layer, keys + values, fp32), parallel={parallel}")
    print(f"gather_kv_batched B={seqs} ctx={context}: {gather * 1e3:7.3f}ms  "
          f"({moved / gather / 1e9:5.1f} GB/s written)")
    print(f"write_kv decode T={seqs}:              {decode * 1e6:7.1f}us")
    print(f"write_kv prefill T={prefill_slots.size}:          {prefill * 1e6:7.1f}us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    start = time.perf_counter()
    warm_up(use_cuda=False)
    print(f"warm-up {time.perf_counter() - start:.1f}s\n")
    for parallel in (False, True):
        bench_sampling(args.vocab, args.repeat, parallel)
        print()
    for parallel in (False, True):
        bench_cache(args.repeat, parallel)


if __name__ == "__main__":
    main()
