"""Output tokens/s of lmserve's engine and of HF transformers, in one run, on the same prompts.

    python loadtests/benchmark_engine.py [--concurrency 1 8 32 64] [--max-tokens 128]
        [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--model PATH | --random-weights]
        [--quantization auto|none|int8|int4] [--enforce-eager] [--tp 1 3] [--skip-hf | --skip-lmserve]

The model is the shipped SmolLM2-135M-Instruct GGUF unless ``--model`` names
another (a GGUF file or an HF directory), or ``--random-weights`` writes a
random model of SmolLM2-135M's shape with the tiny test tokenizer (for a GPU
machine the real weights cannot reach; speed does not depend on the values).

Workload: chat prompts of mixed lengths (about 30 to 300 tokens) and mixed
requested output lengths (50% to 100% of --max-tokens), greedy, EOS ignored,
so both sides produce exactly the requested tokens.

- lmserve: all requests of a concurrency level are submitted at once to the
  torch engine (in-process, through the Backend interface the server uses);
  continuous batching lets each finish when it has its tokens.
- HF: static batching, the same requests in one ``generate`` call (left
  padding); a batch runs until its longest request is done, and only the
  requested tokens count.

Prints a table of output tokens/s per concurrency and the ratio to HF's best; with
several ``--tp`` sizes, a lmserve column for each (ratios: the first size's).
Run it on a quiet machine: both sides share the same cores.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

import torch
from engine_model import engine_model  # loadtests/, the script's own folder
from workload import output_tokens, request_text

from lmserve.core.config import QUANTIZATION_CHOICES


def workload(tokenizer, count: int, max_tokens: int) -> list[tuple[list[int], int]]:
    requests = []
    for i in range(count):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request_text(i)}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        requests.append((ids, output_tokens(i, max_tokens)))
    return requests


def run_lmserve(backend, outputs: queue.SimpleQueue, requests) -> float:
    from lmserve.core.types import EngineRequest, SamplingParams

    pending = set()
    start = time.perf_counter()
    for i, (ids, n) in enumerate(requests):
        rid = f"bench-{time.monotonic_ns()}-{i}"
        pending.add(rid)
        backend.submit(EngineRequest(rid, tuple(ids), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    produced = 0
    while pending:
        out = outputs.get(timeout=600)
        produced += len(out.new_token_ids)
        if out.finish_reason is not None:
            pending.discard(out.request_id)
    elapsed = time.perf_counter() - start
    assert produced == sum(n for _, n in requests), (produced, sum(n for _, n in requests))
    return produced / elapsed


def run_hf(model, tokenizer, requests) -> float:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = [r[0] for r in requests]
    longest = max(n for _, n in requests)
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return sum(n for _, n in requests) / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="Weights and activations of both sides.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both sides.")
    parser.add_argument("--model", type=Path, help="A GGUF file or an HF model directory.")
    parser.add_argument("--random-weights", action="store_true",
                        help="A random model of SmolLM2-135M's shape instead of the real weights.")
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
                        help="lmserve's weight-only quantization (auto: a quantized GGUF keeps its precision).")
    parser.add_argument("--enforce-eager", action="store_true", help="lmserve runs every step op by op.")
    parser.add_argument("--tp", type=int, nargs="+", default=[1],
                        help="Tensor-parallel sizes to measure lmserve at (ranks share the machine's cores).")
    parser.add_argument("--skip-hf", action="store_true", help="Measure lmserve only.")
    parser.add_argument("--skip-lmserve", action="store_true", help="Measure HF only.")
    args = parser.parse_args(argv)

    import transformers

    from lmserve.backends.torch.factory import EngineConfig, create_backend

    path = engine_model(args.model, args.random_weights)
    gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model_dir = str(path.parent) if gguf else str(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **gguf)
    requests = workload(tokenizer, max(args.concurrency), args.max_tokens)

    threads = torch.get_num_threads()  # before ranks take their share
    rows = [[c, None, None] for c in args.concurrency]
    by_tp = {tp: {} for tp in args.tp}
    for tp in args.tp if not args.skip_lmserve else ():
        backend = create_backend(path, EngineConfig(device=args.device, dtype=args.dtype, session_len=2048,
                                                    cache_max_entry_count=0.2, max_batch_size=max(args.concurrency),
                                                    quantization=args.quantization,
                                                    enforce_eager=args.enforce_eager, tensor_parallel_size=tp))
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        backend.start(lambda outs: [outputs.put(o) for o in outs])
        for c in args.concurrency:
            by_tp[tp][c] = run_lmserve(backend, outputs, requests[:c])
            print(f"lmserve tp {tp} concurrency {c:3d}: {by_tp[tp][c]:8.1f} tok/s", file=sys.stderr, flush=True)
        backend.shutdown()
    for row in rows:
        row[1] = by_tp[args.tp[0]].get(row[0])

    if not args.skip_hf:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, **gguf, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        for row in rows:
            row[2] = run_hf(model, tokenizer, requests[: row[0]])
            print(f"HF       concurrency {row[0]:3d}: {row[2]:8.1f} tok/s", file=sys.stderr, flush=True)

    hf_best = max((r[2] for r in rows if r[2]), default=None)
    name = "random SmolLM2-135M-shaped model" if args.random_weights else path.name
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    quantized = f", lmserve --quantization {args.quantization}{' --enforce-eager' * args.enforce_eager}"
    print(f"\n{name}, {args.dtype}{quantized}, {where}, max_tokens {args.max_tokens}\n")
    tp_columns = "".join(f" lmserve tp {tp} tok/s |" for tp in args.tp)
    print(f"| concurrency |{tp_columns} HF tok/s | lmserve / HF same c | lmserve / HF best |")
    print("|---:|" + "---:|" * (len(args.tp) + 3))
    for c, ours, hf in rows:
        same = f"{ours / hf:.2f}x" if hf and ours else "-"
        best = f"{ours / hf_best:.2f}x" if hf_best and ours else "-"
        cells = "".join(f" {by_tp[tp][c]:.1f} |" if c in by_tp[tp] else " - |" for tp in args.tp)
        print(f"| {c} |{cells} {f'{hf:.1f}' if hf else '-'} | {same} | {best} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
