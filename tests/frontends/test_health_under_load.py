"""The engine steps off the event loop: /health stays fast while 64 streams decode."""

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


async def _stream(client, i, first_token_seen):
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
            "max_tokens": 48, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                first_token_seen.add(i)
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
    return usage["completion_tokens"]


async def _probe_health(client, stop, latencies):
    while not stop.is_set():
        start = time.perf_counter()
        response = await client.get("/health", timeout=10)
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200
        await asyncio.sleep(0.02)


def test_health_p99_under_50ms_while_64_streams_decode(smollm2_server):
    async def main():
        latencies: list[float] = []
        decoding: set[int] = set()
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=smollm2_server.base_url, limits=limits) as streams, \
                httpx.AsyncClient(base_url=smollm2_server.base_url) as prober:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_stream(streams, i, decoding)) for i in range(64)]
            while len(decoding) < 64:  # measure while all 64 are decoding
                await asyncio.sleep(0.05)
            probe = asyncio.create_task(_probe_health(prober, stop, latencies))
            chunks = await asyncio.gather(*tasks)
            stop.set()
            await probe
        return latencies, chunks

    latencies, chunks = asyncio.run(main())
    assert chunks == [48] * 64
    assert len(latencies) >= 20, "too few probes to judge"
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"/health p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {len(latencies)} probes")
    assert p99 < 0.050, f"/health p99 {p99 * 1000:.1f} ms over {len(latencies)} probes"
