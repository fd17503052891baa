"""Wall time of a decode step against the time its kernels run on the GPU, in one run.

    python loadtests/profile_decode.py [--device cuda] [--dtype bfloat16] [--batch 64 128]
        [--context 600] [--steps 40] [--model PATH | --random-weights] [--enforce-eager]
        [--top 12] [--trace DIR]

For each batch size: the torch engine (built in-process as the server builds it) takes
``batch`` requests of ``context`` random prompt tokens, steps until every one is
decoding, runs a few decode steps to warm up (CUDA graphs are captured then), and then
``steps`` decode steps twice: timed by the host clock alone (wall per step), and under
``torch.profiler`` (the device's kernel time per step: the self time of every CUDA
kernel, graph replays included). Prints a table with their ratio (the GPU issue asks
for wall within 2x of kernel time) and the most expensive kernels of the largest batch.
On the CPU the "kernel" column is the self time of the ops the profiler saw.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from engine_model import engine_model  # loadtests/, the script's own folder


def fill_batch(engine, batch: int, context: int, max_tokens: int) -> None:
    """``batch`` requests of ``context`` random tokens, stepped until all of them decode."""
    from lmserve.core.types import EngineRequest, SamplingParams

    vocab = engine.runner.model.config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(EngineRequest(f"profile-{i}", tuple(rng.randrange(3, vocab) for _ in range(context)),
                                         params))
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step() if out.new_token_ids)


def step_times(engine, steps: int, device: torch.device) -> float:
    """Seconds per decode step, host clock."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(engine, steps: int, device: torch.device, trace: Path | None):
    """(kernel seconds per step, the profiler's averages by kernel)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        synchronize(device)
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"decode-{device.type}-{time.time_ns()}.json"))
    averages = prof.key_averages()
    if device.type == "cuda":
        kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(a.self_device_time_total for a in kernels)
    else:
        kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CPU]
        total_us = sum(a.self_cpu_time_total for a in kernels)
    return total_us / 1e6 / steps, kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--context", type=int, default=600, help="Prompt tokens of every request.")
    parser.add_argument("--steps", type=int, default=40, help="Decode steps timed (and as many profiled).")
    parser.add_argument("--model", type=Path, help="A GGUF file or an HF model directory.")
    parser.add_argument("--random-weights", action="store_true",
                        help="A random model of SmolLM2-135M's shape (for machines without the real weights).")
    parser.add_argument("--enforce-eager", action="store_true", help="No compiled step or CUDA graphs.")
    parser.add_argument("--top", type=int, default=12, help="Kernels listed for the largest batch.")
    parser.add_argument("--trace", type=Path, help="Write each profile's Chrome trace into this folder.")
    args = parser.parse_args(argv)

    from lmserve.backends.torch.factory import EngineConfig, build_engine

    path = engine_model(args.model, args.random_weights)
    warm_steps = 8
    rows, kernels = [], []
    for batch in args.batch:
        engine = build_engine(path, EngineConfig(device=args.device, dtype=args.dtype, session_len=2048,
                                                 cache_max_entry_count=0.2, max_batch_size=batch,
                                                 enforce_eager=args.enforce_eager))
        device = engine.runner.device
        with torch.inference_mode():
            fill_batch(engine, batch, args.context, max_tokens=warm_steps + 2 * args.steps + 4)
            for _ in range(warm_steps):
                engine.step()
            wall = step_times(engine, args.steps, device)
            kernel, kernels = profile_steps(engine, args.steps, device, args.trace)
        rows.append((batch, wall, kernel))
        print(f"batch {batch}: {wall * 1e3:.2f} ms a step, kernels {kernel * 1e3:.2f} ms", file=sys.stderr, flush=True)
        engine.runner.close()
        del engine

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    name = "random SmolLM2-135M-shaped model" if args.random_weights else path.name
    eager = ", --enforce-eager" if args.enforce_eager else ""
    print(f"\n{name}, {args.dtype}{eager}, {where}, prompts of {args.context} tokens\n")
    print("| batch | wall ms / step | kernel ms / step | wall / kernel | decode tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch, wall, kernel in rows:
        print(f"| {batch} | {wall * 1e3:.2f} | {kernel * 1e3:.2f} | {wall / kernel:.2f}x | {batch / wall:.0f} |")
    print(f"\nTop kernels by self time, batch {rows[-1][0]} ({args.steps} steps):\n")
    print("| kernel | calls / step | ms / step |")
    print("|---|---:|---:|")
    key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for average in sorted(kernels, key=lambda a: getattr(a, key), reverse=True)[: args.top]:
        print(f"| `{average.key[:80]}` | {average.count / args.steps:.1f} | "
              f"{getattr(average, key) / 1e3 / args.steps:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
