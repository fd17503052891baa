"""What constrained rows cost a batch: tokens/s of a steady batch with a share of
its rows under a JSON schema, against the same batch free.

    python loadtests/benchmark_structured_output.py --url http://127.0.0.1:23333 \\
        [--concurrency 32] [--duration 60] [--shares 0 0.5]

``--concurrency`` workers each send chat requests back to back for ``--duration``
seconds (a closed loop: the batch stays that size while requests end and start);
a ``--shares`` fraction of the workers ask for ``response_format`` json_schema
(an array of records: objects with strings, an enum, bounded numbers), the rest
for free text, on the same prompt. Every request asks for ``--max-tokens``;
sampling at temperature 0.8 (constrained requests end when their JSON is complete,
free ones at EOS or ``--max-tokens``). The figure is completion tokens per second over the run, one run per share,
and its ratio to the first share's. Prints a table; ``--json`` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["name", "role", "age", "score"],
        "additionalProperties": False,
    },
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "users", "schema": SCHEMA}}
#: Every row gets the same prompt: the rows differ only by the constraint.
PROMPT = "List the users of a small wiki as JSON: name, role, age and score of each."


async def worker(client: httpx.AsyncClient, model: str, number: int, constrained: bool, max_tokens: int,
                 deadline: float, totals: dict) -> None:
    request = 0
    while time.perf_counter() < deadline:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                "temperature": 0.8, "seed": number * 1000 + request}
        if constrained:
            body["response_format"] = RESPONSE_FORMAT
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        reply = response.json()
        key = "constrained" if constrained else "free"
        totals[key] += reply["usage"]["completion_tokens"]
        if constrained and reply["choices"][0]["finish_reason"] == "stop":
            json.loads(reply["choices"][0]["message"]["content"])  # it must parse
        request += 1


async def run_share(url: str, model: str, concurrency: int, share: float, duration: float,
                    max_tokens: int) -> dict:
    constrained_workers = round(concurrency * share)
    totals = {"constrained": 0, "free": 0}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(worker(client, model, i, i < constrained_workers, max_tokens, deadline, totals)
                               for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    tokens = totals["constrained"] + totals["free"]
    return {"share": share, "constrained_rows": constrained_workers, "seconds": round(elapsed, 1),
            "tokens": tokens, "constrained_tokens": totals["constrained"], "tok_s": round(tokens / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default=None, help="Default: the first of /v1/models.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per share.")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = args.model or httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    # Warm up: compile the format, fill the caches.
    asyncio.run(run_share(args.url, model, 2, 0.5, 1.0, 8))
    rows = [asyncio.run(run_share(args.url, model, args.concurrency, share, args.duration, args.max_tokens))
            for share in args.shares]
    base = rows[0]["tok_s"]
    print(f"| constrained rows of {args.concurrency} | tokens | seconds | tok/s | vs {rows[0]['constrained_rows']} |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        row["ratio"] = round(row["tok_s"] / base, 3) if base else None
        print(f"| {row['constrained_rows']} | {row['tokens']} | {row['seconds']} | {row['tok_s']} | {row['ratio']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
