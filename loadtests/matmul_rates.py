"""How fast this CPU multiplies the MoE benchmark's matrices: torch's plain matmul against
oneDNN's packed weights (what the engine runs on the CPU), in GMAC/s (multiply-adds per
second), next to a large square matmul (about the machine's peak).

    python loadtests/matmul_rates.py [--hidden 1024] [--vocab 49152] [--moe-inner 512]
        [--batch 64] [--expert-rows 16]

It tells how far a compute-bound decode step is from the machine's limit: a step of
``--batch`` streams runs the output projection (batch x hidden x vocab) and, per layer,
the attention projections and each active expert on its share of the rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmserve.backends.torch.packed_linear import pack_weight, packed_linear


def seconds_per_call(fn, min_calls: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(min_calls):
        fn()
    return (time.perf_counter() - start) / min_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--moe-inner", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--expert-rows", type=int, default=16, help="rows per active expert (batch x top-k / experts)")
    args = parser.parse_args()
    h, b, e = args.hidden, args.batch, args.expert_rows
    shapes = [("square (peak)", 2048, 2048, 2048), (f"output projection, {b} rows", b, h, args.vocab),
              (f"q/k/v projection, {b} rows", b, h, h + h // 2), (f"o projection, {b} rows", b, h, h),
              (f"expert gate+up, {e} rows", e, h, 2 * args.moe_inner),
              (f"expert down, {e} rows", e, args.moe_inner, h),
              ("q/k/v projection, 512 prefill rows", 512, h, h + h // 2)]
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| matmul (rows x in x out) | plain GMAC/s | packed GMAC/s | packed ms |")
    print("|---|---:|---:|---:|")
    for name, rows, inputs, outputs in shapes:
        x, weight = torch.randn(rows, inputs), torch.randn(outputs, inputs) / inputs ** 0.5
        calls = max(3, int(2e9 / (rows * inputs * outputs)))
        plain = seconds_per_call(lambda: torch.nn.functional.linear(x, weight), calls)
        packed_weight = pack_weight(weight, rows)
        packed = seconds_per_call(lambda: packed_linear(x, packed_weight, None), calls)
        macs = rows * inputs * outputs
        print(f"| {name} ({rows} x {inputs} x {outputs}) | {macs / plain / 1e9:.1f} | {macs / packed / 1e9:.1f} "
              f"| {packed * 1000:.2f} |")


if __name__ == "__main__":
    main()
