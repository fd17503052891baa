"""Streaming chat over HTTP against any OpenAI-compatible server: tokens/s per concurrency, TTFT.

    python loadtests/benchmark_serving.py --url http://127.0.0.1:23333 [--concurrency 1 8 64]
        [--max-tokens 128] [--long-prompt-tokens 2000] [--label lmserve] [--json out.json]

Workload: the chat prompts of ``benchmark_engine.py`` (``workload.py``: about 30 to 300 tokens,
requested outputs of 50% to 100% of ``--max-tokens``; one request asks for all of
it), greedy, streamed. The model's end tokens (``--ban-token-ids``, default SmolLM2's
0 and 2) are banned with ``logit_bias`` (a field every OpenAI-compatible server
takes), so every server produces exactly the requested tokens. At each concurrency
level that many requests start at once; the figures are output tokens / wall time,
and the median time to first token.

``--long-prompt-tokens N`` also times the first token of one chat prompt of about
N tokens (``max_tokens`` 1), alone on the server, ``--repeats`` times (median).

Any server: lmserve, llama.cpp's server, vLLM, LMDeploy. Run it on a quiet
machine, one server at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from workload import BASE, output_tokens, request_text  # loadtests/, the script's own folder

#: SmolLM2's <|endoftext|> and <|im_end|>: banned so that every request runs to max_tokens.
SMOLLM2_END_TOKEN_IDS = (0, 2)


def chat_workload(count: int, max_tokens: int) -> list[tuple[str, int]]:
    """``(user message, max_tokens)`` per request, as benchmark_engine.py builds them."""
    return [(request_text(i), output_tokens(i, max_tokens)) for i in range(count)]


async def stream_chat(client: httpx.AsyncClient, model: str, text: str, max_tokens: int,
                      banned: tuple[int, ...]) -> tuple[float, int, int | None]:
    """One streamed chat completion: (seconds to the first content, tokens produced,
    prompt tokens if the server reports usage); ``banned`` token ids are never produced."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "logit_bias": {str(i): -100 for i in banned},
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    chunks = usage_tokens = 0
    prompt_tokens = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
                prompt_tokens = event["usage"].get("prompt_tokens")
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), usage_tokens or chunks, prompt_tokens


async def run_level(url: str, model: str, requests: list[tuple[str, int]], banned: tuple[int, ...]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=1024)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(client, model, text, n, banned) for text, n in requests))
        elapsed = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return {"concurrency": len(requests), "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_median_s": statistics.median(r[0] for r in results),
            "requested_tokens": sum(n for _, n in requests)}


def long_text(tokens: int, repeat: int) -> str:
    """A user message of about ``tokens`` tokens (SmolLM2's tokenizer: ~1.13 a word here);
    ``repeat`` changes its first word, so no server can reuse a cached prefix."""
    words = (BASE.split() * (tokens // 10))[: int(tokens / 1.13)]
    return f"Note {repeat}. " + " ".join(words) + "\nSummarize."


async def long_prompt_ttft(url: str, model: str, tokens: int, repeats: int,
                           banned: tuple[int, ...]) -> tuple[float, int | None]:
    """Median seconds to the first token of a chat prompt of about ``tokens`` tokens,
    and the prompt's token count as the server reports it."""
    times, prompt_tokens = [], None
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        for repeat in range(repeats):
            ttft, _, prompt_tokens = await stream_chat(client, model, long_text(tokens, repeat), 1, banned)
            times.append(ttft)
    return statistics.median(times), prompt_tokens


def hf_forward_seconds(gguf: str, tokens: int, repeats: int, dtype: str) -> tuple[float, int]:
    """HF transformers' single forward over the same chat prompt (median seconds, tokens)."""
    import torch
    import transformers

    path = Path(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
    times = []
    for repeat in range(repeats):
        text = tokenizer.apply_chat_template([{"role": "user", "content": long_text(tokens, repeat)}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times), ids.shape[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="The server's base URL, e.g. http://127.0.0.1:23333")
    parser.add_argument("--model", help="The model name to send (default: the first of /v1/models).")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ban-token-ids", type=int, nargs="+", default=list(SMOLLM2_END_TOKEN_IDS),
                        help="The model's end-of-text token ids, banned so every request runs to its max_tokens.")
    parser.add_argument("--long-prompt-tokens", type=int, default=0,
                        help="Also time the first token of one prompt of about this many tokens.")
    parser.add_argument("--repeats", type=int, default=3, help="Long-prompt repeats (median).")
    parser.add_argument("--hf-reference", metavar="GGUF",
                        help="Also time HF transformers' forward over the long prompt, on this GGUF file.")
    parser.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--label", default="server", help="The name printed in the table.")
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args(argv)

    url = args.url.rstrip("/")
    model = args.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    banned = tuple(args.ban_token_ids)
    asyncio.run(run_level(url, model, chat_workload(1, 4), banned))  # warm-up
    rows = []
    for c in args.concurrency:
        row = asyncio.run(run_level(url, model, chat_workload(c, args.max_tokens), banned))
        rows.append(row)
        print(f"{args.label} concurrency {c:3d}: {row['tokens_per_s']:8.1f} tok/s, "
              f"TTFT median {row['ttft_median_s']:.2f} s", file=sys.stderr, flush=True)
    long_ttft = prompt_tokens = hf = None
    if args.long_prompt_tokens:
        long_ttft, prompt_tokens = asyncio.run(long_prompt_ttft(url, model, args.long_prompt_tokens, args.repeats,
                                                                banned))
        if args.hf_reference:
            hf = hf_forward_seconds(args.hf_reference, args.long_prompt_tokens, args.repeats, args.hf_dtype)

    print(f"\n{args.label} at {url}, model {model}, max_tokens {args.max_tokens}\n")
    print("| concurrency | output tok/s | TTFT median s | tokens / requested |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['tokens_per_s']:.1f} | {row['ttft_median_s']:.2f} | "
              f"{row['tokens']} / {row['requested_tokens']} |")
    if long_ttft is not None:
        print(f"\nTTFT of a {prompt_tokens or '~' + str(args.long_prompt_tokens)}-token chat prompt: "
              f"{long_ttft:.2f} s (median of {args.repeats})")
    if hf is not None:
        print(f"HF transformers' forward over the same {hf[1]}-token prompt ({args.hf_dtype}): {hf[0]:.2f} s; "
              f"TTFT / HF forward = {long_ttft / hf[0]:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"label": args.label, "url": url, "model": model, "levels": rows,
                       "long_prompt_tokens": prompt_tokens, "long_prompt_ttft_s": long_ttft,
                       "hf_forward_s": hf and hf[0]}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
