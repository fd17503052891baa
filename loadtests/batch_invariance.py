"""Does a request's reply depend on its neighbours? And what does making it not cost?

    python loadtests/batch_invariance.py [--batch-invariant] [--quantization auto|none|int8|int4]
        [--enforce-eager] [--max-tokens 64] [--model PATH | --random-weights]
    python loadtests/batch_invariance.py --throughput [--concurrency 1 64] [--max-tokens 128] ...

Check mode (the default): 10 chat prompts, each once greedy and once seeded
(temperature 0.8, top_p 0.9, its own seed), are run alone, one at a time; then
all 20 inside a batch of 32 requests whose other 12 have prompts of about 30 to
600 tokens and long outputs, three times over: submitted first, submitted last
in reverse order, and submitted once the others have started. It prints, per
chat and batch, whether the tokens are those of the alone run, and exits 1 if
any differ.

Throughput mode (``--throughput``): output tokens/s at each ``--concurrency``
(benchmark_engine.py's workload, greedy, EOS ignored) with batch invariance off
and on, in the same run, as a table with the ratios (for docs/performance.md).

The model is the shipped SmolLM2-135M-Instruct GGUF unless ``--model`` names
another, or ``--random-weights`` writes a random one of its shape.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

import torch
from benchmark_engine import run_lmserve, workload  # loadtests/, the script's own folder
from engine_model import engine_model
from workload import BASE

from lmserve.core.config import QUANTIZATION_CHOICES

CHATS = [
    "What is the capital of France? Answer in two sentences.",
    "Write a haiku about the sea.",
    "Explain what a hash table is to a beginner.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does a compiler do?",
    "Tell me a fun fact about octopuses.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet.",
]
BATCH_SIZE = 32
#: How the chats sit in the batch: (name, chats first?, reversed?, after the others started?).
PLACEMENTS = [("chats first", True, False, False), ("chats last, reversed", False, True, False),
              ("chats after the others started", False, False, True)]


def chat_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def probes(tokenizer, max_tokens: int):
    """``(name, ids, params)`` of every chat, greedy and seeded."""
    from lmserve.core.types import SamplingParams

    out = []
    for i, text in enumerate(CHATS):
        ids = chat_ids(tokenizer, text)
        out.append((f"chat {i} greedy", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        out.append((f"chat {i} seeded", ids, SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9,
                                                            seed=1000 + i)))
    return out


def fillers(tokenizer, count: int, max_tokens: int):
    """Neighbours: prompts of about 30 to 600 tokens, long outputs."""
    from lmserve.core.types import SamplingParams

    out = []
    for i in range(count):
        text = BASE * (i * 7 % 23) + f"Question {i}: what does the text above say? Answer at length."
        params = SamplingParams(max_tokens=2 * max_tokens + 16 * i, temperature=0.0, ignore_eos=True)
        out.append((f"filler {i}", chat_ids(tokenizer, text), params))
    return out


class Runner:
    """Submits requests to a started backend and collects their tokens."""

    def __init__(self, backend):
        self.backend = backend
        self.outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.tokens: dict[str, list[int]] = {}
        self.pending: set[str] = set()
        self.count = 0
        backend.start(lambda outs: [self.outputs.put(o) for o in outs])

    def submit(self, name: str, ids, params) -> str:
        from lmserve.core.types import EngineRequest

        self.count += 1
        rid = f"{self.count}:{name}"
        self.tokens[rid] = []
        self.pending.add(rid)
        self.backend.submit(EngineRequest(rid, tuple(ids), params))
        return rid

    def wait(self, until=lambda: False) -> None:
        """Collect outputs until every request finished (or ``until()`` holds after an output)."""
        while self.pending:
            out = self.outputs.get(timeout=900)
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            self.tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.pending.discard(out.request_id)
            if until():
                return


def check(backend, tokenizer, max_tokens: int) -> int:
    runner = Runner(backend)
    chats = probes(tokenizer, max_tokens)
    others = fillers(tokenizer, BATCH_SIZE - len(chats), max_tokens)
    alone = {}
    for name, ids, params in chats:
        rid = runner.submit(name, ids, params)
        runner.wait()
        alone[name] = runner.tokens[rid]
    differ = 0
    print(f"| request | {' | '.join(p[0] for p in PLACEMENTS)} |\n|---|" + "---|" * len(PLACEMENTS))
    results = {name: [] for name, _, _ in chats}
    for _, chats_first, reverse, after_start in PLACEMENTS:
        order = list(reversed(chats)) if reverse else chats
        ids_of = {}
        if not chats_first:
            started = [runner.submit(*request) for request in others]
            if after_start:
                runner.wait(until=lambda started=started: all(runner.tokens[r] for r in started))
        for name, ids, params in order:
            ids_of[name] = runner.submit(name, ids, params)
        if chats_first:
            for request in others:
                runner.submit(*request)
        runner.wait()
        for name, _, _ in chats:
            same = runner.tokens[ids_of[name]] == alone[name]
            differ += not same
            results[name].append("same" if same else f"DIFFERS at token {first_difference(runner.tokens[ids_of[name]], alone[name])}")
    for name, cells in results.items():
        print(f"| {name} | {' | '.join(cells)} |")
    total = len(chats) * len(PLACEMENTS)
    print(f"\n{total - differ} of {total} replies identical to the request alone.")
    return 1 if differ else 0


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def throughput(path: Path, tokenizer, args) -> int:
    from lmserve.backends.torch.factory import create_backend

    requests = workload(tokenizer, max(args.concurrency), args.max_tokens)
    rates = {}
    for invariant in (False, True):
        backend = create_backend(path, engine_config(args, invariant, max(args.concurrency)))
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        backend.start(lambda outs, outputs=outputs: [outputs.put(o) for o in outs])
        run_lmserve(backend, outputs, requests[:1])  # first-request costs out of the way
        for c in args.concurrency:
            rates[invariant, c] = run_lmserve(backend, outputs, requests[:c])
            print(f"batch invariant {invariant!s:5}, concurrency {c:3d}: {rates[invariant, c]:8.1f} tok/s",
                  file=sys.stderr, flush=True)
        backend.shutdown()
    print(f"\n{describe(path, args)}, max_tokens {args.max_tokens}\n")
    print("| concurrency | default tok/s | --batch-invariant tok/s | invariant / default |\n|---:|---:|---:|---:|")
    for c in args.concurrency:
        print(f"| {c} | {rates[False, c]:.1f} | {rates[True, c]:.1f} | {rates[True, c] / rates[False, c]:.2f}x |")
    return 0


def engine_config(args, batch_invariant: bool, max_batch_size: int = 128):
    from lmserve.backends.torch.factory import EngineConfig

    return EngineConfig(device="cpu", dtype=args.dtype, session_len=2048, cache_max_entry_count=0.2,
                        max_batch_size=max_batch_size, quantization=args.quantization,
                        enforce_eager=args.enforce_eager, batch_invariant=batch_invariant)


def describe(path: Path, args) -> str:
    name = "random SmolLM2-135M-shaped model" if args.random_weights else path.name
    flags = f"--quantization {args.quantization}{' --enforce-eager' * args.enforce_eager}"
    return f"{name}, {args.dtype}, {flags}, CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-invariant", action="store_true", help="Check the engine with batch invariance on.")
    parser.add_argument("--throughput", action="store_true",
                        help="Measure tokens/s with batch invariance off and on instead of checking replies.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], help="Streams (--throughput).")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="Tokens per chat (default 64), or per request with --throughput (default 128).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="Every step op by op.")
    parser.add_argument("--model", type=Path, help="A GGUF file or an HF model directory.")
    parser.add_argument("--random-weights", action="store_true",
                        help="A random model of SmolLM2-135M's shape instead of the real weights.")
    args = parser.parse_args(argv)

    import transformers

    from lmserve.backends.torch.factory import create_backend

    path = engine_model(args.model, args.random_weights)
    gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent) if gguf else str(path), **gguf)
    if args.throughput:
        args.max_tokens = args.max_tokens or 128
        return throughput(path, tokenizer, args)
    args.max_tokens = args.max_tokens or 64
    backend = create_backend(path, engine_config(args, args.batch_invariant))
    print(f"{describe(path, args)}{' --batch-invariant' * args.batch_invariant}, max_tokens {args.max_tokens}\n")
    start = time.perf_counter()
    try:
        return check(backend, tokenizer, args.max_tokens)
    finally:
        backend.shutdown()
        print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
