"""Streaming chat over HTTP against OpenAI-compatible servers, in the manner of ``vllm bench serve``.

    python loadtests/benchmark_serving.py --url [LABEL=]URL [[LABEL=]URL ...]
        [--concurrency 1 8 64 | --request-rate 1 4 inf] [--num-prompts N]
        [--dataset chat|random] [--random-input-len 256] [--random-output-len 128]
        [--random-range-ratio 0.5] [--turns 1] [--seed 0] [--max-tokens 128]
        [--long-prompt-tokens 2000] [--json out.json] [--csv out.csv] [--png out.png]

    python loadtests/benchmark_serving.py --serve-hf GGUF --port 8100   # HF transformers as a server

Every server (the first is the baseline: lmserve) gets the same seeded workload, one
after the other, and the table shows each one's ratio to the first.

Workloads:
- ``chat`` (default): the chat prompts of ``benchmark_engine.py`` (``workload.py``:
  about 30 to 300 tokens, outputs of 50% to 100% of ``--max-tokens``; one request asks
  for all of it).
- ``random``: prompts of random words, lengths drawn uniformly within
  ``--random-range-ratio`` of ``--random-input-len`` tokens, outputs likewise around
  ``--random-output-len``, seeded by ``--seed``.
- ``--turns T``: each request is a conversation of T turns, each turn sending the whole
  history (the answers so far and a new question); every turn is measured.

Load: ``--concurrency C``: ``--num-prompts`` requests (default C) with at most C in
flight; ``--request-rate R``: requests arrive as a Poisson process of R per second
(``inf``: all at once), however many are in flight. Greedy, streamed, with the model's
end tokens banned through ``logit_bias`` (``--ban-token-ids``; default SmolLM2's 0 and
2), so every server produces exactly the requested tokens.

Figures per level: output tokens/s and requests/s over the wall time; TTFT (time to the
first content), TPOT (per output token after the first), ITL (between content chunks)
and E2E latency at p50, p90 and p99. ``--long-prompt-tokens N`` also times the first
token of one N-token chat prompt alone on each server (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from workload import BASE, output_tokens, request_text  # loadtests/, the script's own folder

#: SmolLM2's <|endoftext|> and <|im_end|>: banned so that every request runs to max_tokens.
SMOLLM2_END_TOKEN_IDS = (0, 2)
PERCENTILES = (50, 90, 99)
#: Random-word prompts: words of this list run about 1.2 tokens each with SmolLM2's tokenizer.
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact water river stone light music garden market letter city night story").split()


@dataclass
class Request:
    """One conversation: its user messages (one per turn) and each turn's output length."""

    questions: list[str]
    max_tokens: list[int]


@dataclass
class TurnResult:
    ttft: float
    e2e: float
    output_tokens: int
    prompt_tokens: int | None
    itls: list[float] = field(default_factory=list)


def chat_workload(count: int, max_tokens: int) -> list[tuple[str, int]]:
    """``(user message, max_tokens)`` per request, as benchmark_engine.py builds them."""
    return [(request_text(i), output_tokens(i, max_tokens)) for i in range(count)]


def random_text(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / 1.2))))


def make_workload(args: argparse.Namespace, count: int) -> list[Request]:
    """``count`` seeded conversations of ``args.turns`` turns."""
    rng = random.Random(args.seed)
    requests = []
    for i in range(count):
        if args.dataset == "chat":
            text, n = chat_workload(i + 1, args.max_tokens)[i]
            questions, lengths = [text], [n]
        else:
            ratio = args.random_range_ratio

            def draw(mean: int) -> int:
                return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))

            questions, lengths = [random_text(rng, draw(args.random_input_len))], [draw(args.random_output_len)]
        for turn in range(1, args.turns):
            questions.append(f"Follow-up {turn}: " + random_text(rng, 24))
            lengths.append(lengths[0])
        requests.append(Request(questions, lengths))
    return requests


async def stream_chat(client: httpx.AsyncClient, model: str, messages: list[dict] | str, max_tokens: int,
                      banned: tuple[int, ...]) -> tuple[TurnResult, str]:
    """One streamed chat completion (``messages``: the history, or one user message): its
    figures and its text; ``banned`` token ids are never produced."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "logit_bias": {str(i): -100 for i in banned}, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    itls, text = [], []
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
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    chunks += 1
                    text.append(content)
                    if first is None:
                        first = now - start
                    else:
                        itls.append(now - last)
                    last = now
    e2e = time.perf_counter() - start
    return TurnResult(first if first is not None else e2e, e2e, usage_tokens or chunks, prompt_tokens, itls), \
        "".join(text)


async def converse(client: httpx.AsyncClient, model: str, request: Request,
                   banned: tuple[int, ...]) -> list[TurnResult]:
    """Every turn of a conversation, each sending the history so far."""
    messages, results = [], []
    for question, max_tokens in zip(request.questions, request.max_tokens):
        messages.append({"role": "user", "content": question})
        result, answer = await stream_chat(client, model, list(messages), max_tokens, banned)
        messages.append({"role": "assistant", "content": answer})
        results.append(result)
    return results


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": math.nan for p in PERCENTILES}
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES}


async def run_level(url: str, model: str, requests: list[Request] | list[tuple[str, int]], banned: tuple[int, ...],
                    concurrency: int | None = None, rate: float | None = None, seed: int = 0) -> dict:
    """Run ``requests`` (at most ``concurrency`` in flight, or arriving at ``rate`` per second;
    default: all at once) and summarize them."""
    requests = [r if isinstance(r, Request) else Request([r[0]], [r[1]]) for r in requests]
    limit = asyncio.Semaphore(concurrency or len(requests))
    arrivals = random.Random(seed)

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=1024)) as client:
        async def one(request: Request, delay: float) -> list[TurnResult]:
            await asyncio.sleep(delay)
            async with limit:
                return await converse(client, model, request, banned)

        delays, clock = [], 0.0
        for _ in requests:
            delays.append(clock)
            if rate is not None and math.isfinite(rate):
                clock += arrivals.expovariate(rate)
        start = time.perf_counter()
        results = [turn for turns in await asyncio.gather(*(one(r, d) for r, d in zip(requests, delays)))
                   for turn in turns]
        elapsed = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in results)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    return {
        "concurrency": concurrency or len(requests), "request_rate": rate, "requests": len(results),
        "tokens": tokens, "requested_tokens": sum(sum(r.max_tokens) for r in requests),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
        "seconds": elapsed, "tokens_per_s": tokens / elapsed, "requests_per_s": len(results) / elapsed,
        "ttft_median_s": statistics.median(r.ttft for r in results),
        "ttft_s": percentiles([r.ttft for r in results]), "tpot_s": percentiles(tpots),
        "itl_s": percentiles([gap for r in results for gap in r.itls]), "e2e_s": percentiles([r.e2e for r in results]),
    }


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
            result, _ = await stream_chat(client, model, long_text(tokens, repeat), 1, banned)
            times.append(result.ttft)
            prompt_tokens = result.prompt_tokens
    return statistics.median(times), prompt_tokens


def load_hf(gguf: str, dtype: str):
    import torch
    import transformers

    path = Path(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
    return tokenizer, model


def hf_forward_seconds(gguf: str, tokens: int, repeats: int, dtype: str) -> tuple[float, int]:
    """HF transformers' single forward over the same chat prompt (median seconds, tokens)."""
    import torch

    tokenizer, model = load_hf(gguf, dtype)
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


def serve_hf(gguf: str, port: int, dtype: str) -> None:
    """HF transformers behind a minimal OpenAI-style server: ``/v1/models`` and streamed
    ``/v1/chat/completions`` (greedy, ``logit_bias`` as a ban, usage at the end), one
    request at a time: ``generate`` has no continuous batching."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch
    import transformers

    tokenizer, model = load_hf(gguf, dtype)
    one_at_a_time = threading.Lock()
    name = Path(gguf).name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode())
            self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            banned = [[int(token)] for token, bias in (body.get("logit_bias") or {}).items() if bias <= -100]
            streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")  # one connection per request: no keep-alive races
            self.end_headers()
            self.close_connection = True

            def event(payload) -> None:
                data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            with one_at_a_time:
                kwargs = dict(input_ids=ids, max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                              streamer=streamer, bad_words_ids=banned or None, pad_token_id=tokenizer.eos_token_id)
                generated = []

                def generate() -> None:
                    with torch.inference_mode():
                        generated.append(model.generate(**kwargs))

                worker = threading.Thread(target=generate)
                worker.start()
                for text in streamer:
                    if text:
                        event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
                worker.join()
            completion = generated[0].shape[1] - ids.shape[1] if generated else 0
            event({"choices": [], "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": completion,
                                            "total_tokens": ids.shape[1] + completion}})
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

    print(f"HF transformers ({dtype}) serving {name} on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # every waiting client connects at once

    Server(("127.0.0.1", port), Handler).serve_forever()


def parse_server(spec: str, index: int) -> tuple[str, str]:
    label, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
    return label or ("lmserve" if index == 0 else f"server {index}"), url.rstrip("/")


def measure(label: str, url: str, args: argparse.Namespace, levels: list) -> dict:
    model = args.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    banned = tuple(args.ban_token_ids)
    asyncio.run(run_level(url, model, chat_workload(1, 4), banned))  # warm-up
    rows = []
    for level in levels:
        if args.request_rate:
            count = args.num_prompts or 64
            row = asyncio.run(run_level(url, model, make_workload(args, count), banned, rate=level, seed=args.seed))
        else:
            requests = make_workload(args, args.num_prompts or level)
            row = asyncio.run(run_level(url, model, requests, banned, concurrency=level))
        rows.append(row)
        print(f"{label} {'rate' if args.request_rate else 'concurrency'} {level}: {row['tokens_per_s']:8.1f} tok/s, "
              f"TTFT p50 {row['ttft_s']['p50']:.2f} s", file=sys.stderr, flush=True)
    figures = {"label": label, "url": url, "model": model, "levels": rows,
               "long_prompt_tokens": None, "long_prompt_ttft_s": None}
    if args.long_prompt_tokens:
        figures["long_prompt_ttft_s"], figures["long_prompt_tokens"] = asyncio.run(
            long_prompt_ttft(url, model, args.long_prompt_tokens, args.repeats, banned))
    return figures


def print_tables(servers: list[dict], args: argparse.Namespace) -> None:
    base = servers[0]
    level_name = "request rate" if args.request_rate else "concurrency"
    print(f"\nmodel {base['model']}, dataset {args.dataset}, {args.turns} turn(s), seed {args.seed}\n")
    header = [f"{s['label']} tok/s" for s in servers] + [f"{s['label']} / {base['label']}" for s in servers[1:]]
    print(f"| {level_name} | " + " | ".join(header) + " |")
    print("|---:|" + "---:|" * len(header))
    for i, row in enumerate(base["levels"]):
        level = row["request_rate"] if args.request_rate else row["concurrency"]
        cells = [f"{s['levels'][i]['tokens_per_s']:.1f}" for s in servers]
        cells += [f"{s['levels'][i]['tokens_per_s'] / row['tokens_per_s']:.2f}x" for s in servers[1:]]
        print(f"| {level} | " + " | ".join(cells) + " |")
    print("\n| server | " + level_name + " | output tok/s | req/s | TTFT p50 / p90 / p99 s | TPOT p50 / p90 / p99 ms "
          "| ITL p50 / p99 ms | E2E p50 / p99 s | tokens / requested |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for server in servers:
        for row in server["levels"]:
            level = row["request_rate"] if args.request_rate else row["concurrency"]
            ttft, tpot, itl, e2e = row["ttft_s"], row["tpot_s"], row["itl_s"], row["e2e_s"]
            print(f"| {server['label']} | {level} | {row['tokens_per_s']:.1f} | {row['requests_per_s']:.2f} | "
                  f"{ttft['p50']:.2f} / {ttft['p90']:.2f} / {ttft['p99']:.2f} | "
                  f"{tpot['p50'] * 1e3:.1f} / {tpot['p90'] * 1e3:.1f} / {tpot['p99'] * 1e3:.1f} | "
                  f"{itl['p50'] * 1e3:.1f} / {itl['p99'] * 1e3:.1f} | {e2e['p50']:.2f} / {e2e['p99']:.2f} | "
                  f"{row['tokens']} / {row['requested_tokens']} |")
    for server in servers:
        if server["long_prompt_ttft_s"] is not None:
            print(f"\n{server['label']}: TTFT of a {server['long_prompt_tokens'] or '~' + str(args.long_prompt_tokens)}"
                  f"-token chat prompt: {server['long_prompt_ttft_s']:.2f} s (median of {args.repeats})")


def write_csv(servers: list[dict], path: str) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        metrics = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
        writer.writerow(["server", "concurrency", "request_rate", "requests", "tokens", "seconds", "tokens_per_s",
                         "requests_per_s"] + [f"{m}_p{p}" for m in metrics for p in PERCENTILES])
        for server in servers:
            for row in server["levels"]:
                writer.writerow([server["label"], row["concurrency"], row["request_rate"], row["requests"],
                                 row["tokens"], f"{row['seconds']:.3f}", f"{row['tokens_per_s']:.2f}",
                                 f"{row['requests_per_s']:.3f}"]
                                + [f"{row[m][f'p{p}']:.4f}" for m in metrics for p in PERCENTILES])


def write_chart(servers: list[dict], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    key = "request_rate" if args.request_rate else "concurrency"
    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(11, 4))
    for server in servers:
        levels = [row[key] for row in server["levels"]]
        throughput.plot(levels, [row["tokens_per_s"] for row in server["levels"]], marker="o", label=server["label"])
        latency.plot(levels, [row["ttft_s"]["p50"] for row in server["levels"]], marker="o", label=server["label"])
    for axes, title in ((throughput, "output tokens/s"), (latency, "TTFT p50 (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel(key.replace("_", " "))
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{servers[0]['model']}: streamed chat, {args.dataset} workload")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", nargs="+", help="The servers, [LABEL=]URL each; the first is the baseline.")
    parser.add_argument("--model", help="The model name to send (default: each server's first of /v1/models).")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--request-rate", type=float, nargs="*", default=None,
                        help="Poisson arrival rates (requests/s; inf: all at once) instead of --concurrency.")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="Requests per level (default: the concurrency, or 64 with --request-rate).")
    parser.add_argument("--dataset", choices=["chat", "random"], default="chat")
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.5)
    parser.add_argument("--turns", type=int, default=1, help="Turns per conversation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ban-token-ids", type=int, nargs="+", default=list(SMOLLM2_END_TOKEN_IDS),
                        help="The model's end-of-text token ids, banned so every request runs to its max_tokens.")
    parser.add_argument("--long-prompt-tokens", type=int, default=0,
                        help="Also time the first token of one prompt of about this many tokens.")
    parser.add_argument("--repeats", type=int, default=3, help="Long-prompt repeats (median).")
    parser.add_argument("--hf-reference", metavar="GGUF",
                        help="Also time HF transformers' forward over the long prompt, on this GGUF file.")
    parser.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--label", default=None, help="The first server's name (default: lmserve).")
    parser.add_argument("--json", help="Also write the figures to this file.")
    parser.add_argument("--csv", help="Also write one row per server and level to this file.")
    parser.add_argument("--png", help="Also draw throughput and TTFT per level to this file (matplotlib).")
    parser.add_argument("--serve-hf", metavar="GGUF", help="Serve HF transformers on --port instead of measuring.")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    if args.serve_hf:
        serve_hf(args.serve_hf, args.port, args.hf_dtype)
        return 0
    if not args.url:
        parser.error("--url is required")

    levels = args.request_rate or args.concurrency
    servers = []
    for index, spec in enumerate(args.url):
        label, url = parse_server(spec, index)
        servers.append(measure(args.label if index == 0 and args.label else label, url, args, levels))
    print_tables(servers, args)
    hf = None
    if args.long_prompt_tokens and args.hf_reference:
        hf = hf_forward_seconds(args.hf_reference, args.long_prompt_tokens, args.repeats, args.hf_dtype)
        print(f"HF transformers' forward over the same {hf[1]}-token prompt ({args.hf_dtype}): {hf[0]:.2f} s; "
              f"{servers[0]['label']} TTFT / HF forward = {servers[0]['long_prompt_ttft_s'] / hf[0]:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**servers[0], "hf_forward_s": hf and hf[0], "peers": servers[1:]}, out, indent=2)
    if args.csv:
        write_csv(servers, args.csv)
    if args.png:
        write_chart(servers, args.png, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
