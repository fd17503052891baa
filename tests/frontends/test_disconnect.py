"""A client that disconnects aborts its generation, streaming or not.

Sanic cancels the handler of a connection that closes (``connection_lost``);
the cancellation reaches ``RequestBus.generate``, whose ``finally`` aborts the
request in the engine. Seen from outside: ``/metrics`` shows the engine idle
again and its KV cache back to its idle use, long before the generation would
have finished.
"""

import json
import socket
import time

import httpx
import pytest

MAX_TOKENS = 30000  # minutes of decoding on the tiny model; the test takes a second


@pytest.fixture(scope="module")
def server(long_model_dir):
    from conftest import LiveServer

    # 1024 blocks of 64 tokens: a long request's share of the cache is visible in the gauge.
    server = LiveServer(long_model_dir, "--model-name", "tiny", "--cache-max-entry-count", "1024")
    yield server
    server.stop()


def metrics(server) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lmserve:") and "_bucket{" not in line:
            name = line.split("{", 1)[0]
            if "finished_reason=" in line:
                name += "{" + line.split('finished_reason="', 1)[1].split('"', 1)[0] + "}"
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def wait_until(server, condition, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not condition(current := metrics(server)):
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {current}"
        time.sleep(0.02)
    return current


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "abc"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}]}),
])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_closing_the_connection_aborts_the_generation(server, endpoint, body, stream):
    idle = wait_until(server, lambda m: m["lmserve:num_requests_running"] == 0, timeout=10)
    data = json.dumps({"model": "tiny", **body, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(f"POST {endpoint} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        busy = wait_until(server, lambda m: m["lmserve:num_requests_running"] == 1
                          and m["lmserve:kv_cache_usage_perc"] > idle["lmserve:kv_cache_usage_perc"], timeout=30)
    finally:
        sock.close()
    closed = time.monotonic()
    after = wait_until(server, lambda m: m["lmserve:num_requests_running"] == 0
                       and m["lmserve:kv_cache_usage_perc"] == idle["lmserve:kv_cache_usage_perc"], timeout=5)
    assert time.monotonic() - closed < 5
    assert after["lmserve:request_success_total{abort}"] == idle.get("lmserve:request_success_total{abort}", 0) + 1
    generated = after["lmserve:generation_tokens_total"] - idle.get("lmserve:generation_tokens_total", 0)
    assert generated < MAX_TOKENS / 2, "the generation ran on after the client left"
    assert busy["lmserve:num_requests_running"] == 1
