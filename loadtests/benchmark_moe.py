"""Mixture of experts: lmserve over HTTP against HF transformers' best static batch, and
against a dense model with the same active parameters, in one run.

    python loadtests/benchmark_moe.py [--concurrency 1 64] [--max-tokens 64] [--hidden 1024]
        [--layers 4] [--experts 8] [--top-k 2] [--moe-inner 512] [--dtype float32|bfloat16]
        [--hf-batches 1 8 32 64] [--lmserve-args ...]

Writes two random models with SmolLM2's tokenizer (from the shipped GGUF): a Qwen3-MoE
(``--experts`` experts, ``--top-k`` active, each of inner size ``--moe-inner``) and a
dense Qwen3 whose MLP has the same active size (``top_k * moe_inner``); speed does not
depend on the weights' values. Workload: benchmark_serving.py's chat prompts, greedy,
end tokens banned, so every request runs to its requested length.

- lmserve: ``lmserve serve api_server`` on each model, streamed chat through HTTP at each
  ``--concurrency`` (output tokens/s over the wall time; TPOT p50 at concurrency 1 is the
  per-step time of one stream).
- HF: ``generate`` in static batches of each ``--hf-batches`` size over the same requests
  (left padding; a batch runs until its longest request ends; only requested tokens
  count); its best size is the baseline.

Run it on a quiet machine: both sides share the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark_engine import run_hf  # loadtests/, the script's own folder
from benchmark_serving import SMOLLM2_END_TOKEN_IDS, chat_workload, run_level
from engine_model import shipped_gguf
from local_server import local_server


def write_models(directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The MoE and the dense model (same attention, same active MLP size), with SmolLM2's tokenizer."""
    import transformers

    gguf = shipped_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    heads = args.hidden // 64
    common = dict(vocab_size=49152, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=True)
    models = {
        "moe": transformers.Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                           moe_intermediate_size=args.moe_inner, intermediate_size=args.moe_inner,
                                           norm_topk_prob=True, decoder_sparse_step=1),
        "dense": transformers.Qwen3Config(**common, intermediate_size=args.top_k * args.moe_inner),
    }
    paths = []
    for name, config in models.items():
        path = directory / name
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        paths.append(path)
    return paths[0], paths[1]


def lmserve_levels(path: Path, args: argparse.Namespace) -> dict[int, dict]:
    rows = {}
    with local_server(None, str(path), ["--model-name", "m", "--dtype", args.dtype, *args.lmserve_args]) as url:
        asyncio.run(run_level(url, "m", chat_workload(2, 4), SMOLLM2_END_TOKEN_IDS))  # warm-up
        for level in args.concurrency:
            rows[level] = asyncio.run(run_level(url, "m", chat_workload(level, args.max_tokens),
                                                SMOLLM2_END_TOKEN_IDS, concurrency=level))
            print(f"lmserve {path.name} c{level}: {rows[level]['tokens_per_s']:.1f} tok/s, TPOT p50 "
                  f"{rows[level]['tpot_s']['p50'] * 1000:.1f} ms", file=sys.stderr, flush=True)
    return rows


def hf_best(path: Path, args: argparse.Namespace) -> dict[int, float]:
    """HF's output tokens/s at each static batch size, over the largest concurrency's requests."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
    requests = []
    for text, n in chat_workload(max(args.concurrency), args.max_tokens):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        requests.append((tokenizer(prompt, add_special_tokens=False)["input_ids"], n))
    results = {}
    for size in args.hf_batches:
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(requests), size):
            batch = requests[first:first + size]
            run_hf(model, tokenizer, batch)
            tokens += sum(n for _, n in batch)
        results[size] = tokens / (time.perf_counter() - start)
        print(f"HF {path.name} batch {size}: {results[size]:.1f} tok/s", file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-inner", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--hf-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--lmserve-args", nargs=argparse.REMAINDER, default=[],
                        help="Passed on to `lmserve serve api_server` (must come last).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as scratch:
        moe, dense = write_models(Path(scratch), args)
        ours = {"moe": lmserve_levels(moe, args), "dense": lmserve_levels(dense, args)}
        hf = {} if args.skip_hf else hf_best(moe, args)
    best_size, best = max(hf.items(), key=lambda item: item[1]) if hf else (None, float("nan"))
    print(f"\nQwen3-MoE-shaped: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
          f"expert inner {args.moe_inner}; dense twin: inner {args.top_k * args.moe_inner}; {args.dtype}; "
          f"{args.max_tokens} max tokens\n")
    print("| concurrency | lmserve MoE tok/s | lmserve dense tok/s | MoE / dense | MoE / HF best |")
    print("|---|---|---|---|---|")
    for level in args.concurrency:
        moe_row, dense_row = ours["moe"][level], ours["dense"][level]
        print(f"| {level} | {moe_row['tokens_per_s']:.1f} | {dense_row['tokens_per_s']:.1f} | "
              f"{moe_row['tokens_per_s'] / dense_row['tokens_per_s']:.2f} | {moe_row['tokens_per_s'] / best:.2f}x |")
    if hf:
        print(f"\nHF best static batch: {best:.1f} tok/s at batch {best_size} "
              f"({', '.join(f'{size}: {value:.1f}' for size, value in hf.items())})")
    one = min(args.concurrency)
    moe_tpot, dense_tpot = ours["moe"][one]["tpot_s"]["p50"], ours["dense"][one]["tpot_s"]["p50"]
    print(f"Per-step time at concurrency {one} (TPOT p50): MoE {moe_tpot * 1000:.1f} ms, dense "
          f"{dense_tpot * 1000:.1f} ms, ratio {moe_tpot / dense_tpot:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
