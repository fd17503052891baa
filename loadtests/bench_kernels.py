"""Micro-benchmark of the Numba kernels on the CPU: prints a table of per-call times.

    python loadtests/bench_kernels.py [--vocab 49152] [--repeat 50]

Sampling: one engine step for B rows of a V-token vocabulary, logits ~ N(0, 3^2)
(penalised rows: a 500-token prompt and 100 output tokens); the input copy and
the batch building are not timed. Decode attention: one layer's 64 decodes
(contexts of 60 to 440 tokens, 9 query heads over 3 KV heads x 64, block size
64) read in place by the kernel, against gathering their blocks and attending
with torch (the other path).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from lmserve.backends.torch.kernels import attention, sampling, warm_up
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


def bench_decode_attention(repeat: int) -> None:
    import torch

    from lmserve.backends.torch.attention import grouped_attention

    seqs, kv_heads, group, head_dim, block_size, num_blocks = 64, 3, 3, 64, 64, 600
    rng = np.random.default_rng(2)
    context_lens = rng.integers(60, 440, seqs).astype(np.int64)
    max_blocks = int(-(-context_lens.max() // block_size))
    tables = np.full((seqs, max_blocks), num_blocks, np.int64)  # padding: the last block
    blocks = rng.permutation(num_blocks)
    used = 0
    for i, n in enumerate(context_lens):
        count = -(-int(n) // block_size)
        tables[i, :count] = blocks[used : used + count]
        used += count
    blocks_per_head = num_blocks + 1
    head_blocks = (np.arange(kv_heads)[None, :, None] * blocks_per_head + tables[:, None, :]).reshape(-1)
    positions = np.arange(max_blocks * block_size)
    bias = torch.from_numpy(np.where(positions[None] < context_lens[:, None], 0, -np.inf)
                            .astype(np.float32)[:, None, None, :])
    print(f"\ndecode attention (one layer, B={seqs}, ctx 60-440, mean {context_lens.mean():.0f})")
    for dtype in (torch.float32, torch.bfloat16):
        shape = (kv_heads * blocks_per_head, block_size, head_dim)
        keys, values = (torch.randn(shape).to(dtype) for _ in range(2))
        query = torch.randn(seqs, kv_heads, group, head_dim).to(dtype)
        index = torch.from_numpy(head_blocks)

        def gathered():
            context = (seqs, kv_heads, max_blocks * block_size, head_dim)
            k = keys.view(shape[0], -1).index_select(0, index).view(context)
            v = values.view(shape[0], -1).index_select(0, index).view(context)
            return grouped_attention(query, k, v, bias)

        as_numpy = (lambda t: t.view(torch.int16).numpy().view(np.uint16)) if dtype == torch.bfloat16 \
            else (lambda t: t.numpy())
        out = np.empty(query.shape, np.float32)

        def in_place():
            attention.decode_attention(query.float().numpy(), as_numpy(keys), as_numpy(values), tables,
                                       context_lens, out)

        with torch.inference_mode():
            torch_time = time_call(gathered, lambda: (), repeat)
            kernel_time = time_call(in_place, lambda: (), repeat)
        print(f"{str(dtype):15s} in place {kernel_time * 1e3:7.3f}ms   gather + matmuls {torch_time * 1e3:7.3f}ms")


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
    bench_decode_attention(args.repeat)


if __name__ == "__main__":
    main()
