"""The operational side of the HTTP server: API keys, CORS, request limits, flag checks.

One live server carries every flag; the limits tests keep its one generation
slot busy with a long stream from the tiny model given a 32k-token context.
"""

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from sanic import Sanic

from lmserve.core.plugins import PluginError
from lmserve.frontends.cli import main
from lmserve.frontends.http.cors import CORSPolicy
from lmserve.frontends.http.limits import AdmissionQueue, admitted, refuse_generation_flags, request_weight

KEYS = ("key-one", "key-two")
ORIGIN = "https://app.example.com"
MAX_BYTES = 65536
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def server(long_model_dir):
    from conftest import LiveServer

    server = LiveServer(
        long_model_dir, "--model-name", "tiny", "--api-keys", *KEYS,
        "--allow-origins", ORIGIN, "--allow-credentials",
        "--max-concurrent-requests", "1", "--max-queued-requests", "1",
        "--max-request-bytes", str(MAX_BYTES),
    )
    yield server
    server.stop()


def assert_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == status and body["code"] == status and body["error"]["message"]
    return body


def metric(server, name):
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_for_metric(server, name, value, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (current := metric(server, name)) != value:
        assert time.monotonic() < deadline, f"{name} stayed {current}, expected {value}"
        time.sleep(0.02)


def open_request(server, body: dict, headers: dict = AUTH) -> socket.socket:
    """A raw connection that has sent ``POST /v1/completions`` and not read a byte."""
    data = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return sock


LONG_STREAM = {"model": "tiny", "prompt": "abc", "max_tokens": 30000, "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "abc", "max_tokens": 4}


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before {marker!r}: {data[:300]!r}"
        data += chunk
    return data


# ------------------------------------------------------------------------ API keys


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"},
    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEYS[0]}x"},
])
def test_api_routes_need_a_valid_key(server, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                         ("POST", "/tokenize/"), ("POST", "/detokenize"), ("GET", "/v1/nothing")]:
        response = httpx.request(method, server.base_url + path, json={"prompt": "x"}, headers=headers)
        body = assert_error(response, 401)
        assert body["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", KEYS)
def test_every_key_is_accepted_and_the_scheme_is_case_insensitive(server, key):
    for scheme in ("Bearer", "bearer"):
        response = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"{scheme} {key}"})
        assert response.status_code == 200, response.text
    tokens = httpx.post(server.base_url + "/tokenize", json={"prompt": "abc"}, headers={"Authorization": f"Bearer {key}"})
    assert tokens.status_code == 200 and tokens.json()["count"] > 0


def test_open_routes_need_no_key(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    for path in ("/openapi.json", "/"):  # served or not by the docs, never behind the key
        assert httpx.get(server.base_url + path).status_code != 401


def test_the_openai_sdk_authenticates_with_api_key(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[0], max_retries=0)
    reply = client.completions.create(model="tiny", prompt="abc", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------------------- CORS


def test_preflight_is_answered_without_a_key(server):
    response = httpx.options(server.base_url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    })
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "Origin" in response.headers["vary"]


def test_preflight_from_another_origin_is_refused(server):
    response = httpx.options(server.base_url + "/v1/models", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"})
    assert_error(response, 400)
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("headers, status", [({}, 401), (AUTH, 200)])
def test_responses_to_an_allowed_origin_carry_cors_headers(server, headers, status):
    response = httpx.get(server.base_url + "/v1/models", headers={"Origin": ORIGIN, **headers})
    assert response.status_code == status
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"


def test_a_stream_to_an_allowed_origin_carries_cors_headers(server):
    body = {**SHORT, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                      headers={"Origin": ORIGIN, **AUTH}, timeout=60) as response:
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"


@pytest.mark.parametrize("origin", ["https://evil.example.com", None])
def test_other_origins_get_no_cors_headers(server, origin):
    headers = {**AUTH, **({"Origin": origin} if origin else {})}
    response = httpx.get(server.base_url + "/v1/models", headers=headers)
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)


def test_no_cors_headers_without_allow_origins(tiny_server):
    response = httpx.get(tiny_server.base_url + "/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)


# ---------------------------------------------------------------------- body size


def test_a_body_over_the_limit_is_413(server):
    big = {"model": "tiny", "prompt": "a" * (2 * MAX_BYTES), "max_tokens": 1}
    body = assert_error(httpx.post(server.base_url + "/v1/completions", json=big, headers=AUTH, timeout=30), 413)
    assert str(MAX_BYTES) in body["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(4):
            yield b" " * MAX_BYTES

    response = httpx.post(server.base_url + "/v1/completions", content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert_error(response, 413)
    fits = {"model": "tiny", "prompt": "a" * (MAX_BYTES // 2), "max_tokens": 1}
    assert httpx.post(server.base_url + "/tokenize", json=fits, headers=AUTH, timeout=30).status_code == 200


# ---------------------------------------------------------------- admission queue


def test_the_queue_admits_in_turn_and_refuses_when_full(server):
    running = open_request(server, LONG_STREAM)
    waiting = None
    try:
        read_until(running, b"data: ")  # it holds the only slot
        assert metric(server, "lmserve:num_http_requests_running") == 1
        waiting = open_request(server, SHORT)
        wait_for_metric(server, "lmserve:num_http_requests_waiting", 1)

        rejected_before = metric(server, "lmserve:http_requests_rejected_total")
        refused = httpx.post(server.base_url + "/v1/completions", json=SHORT, headers=AUTH, timeout=30)
        assert_error(refused, 503)
        assert refused.headers["retry-after"] == "1"
        assert metric(server, "lmserve:http_requests_rejected_total") == rejected_before + 1
        # Other routes are not limited.
        assert httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}, headers=AUTH).status_code == 200

        running.close()  # the slot goes to the waiting request, which completes
        reply = read_until(waiting, b'"usage"')
        assert reply.startswith(b"HTTP/1.1 200") and b'"completion_tokens":4' in reply
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    wait_for_metric(server, "lmserve:num_http_requests_running", 0)


def test_a_waiting_client_that_leaves_frees_its_place(server):
    running = open_request(server, LONG_STREAM)
    try:
        read_until(running, b"data: ")
        leaving = open_request(server, SHORT)
        wait_for_metric(server, "lmserve:num_http_requests_waiting", 1)
        leaving.close()
        wait_for_metric(server, "lmserve:num_http_requests_waiting", 0)
        # Its place is free: the next request queues instead of getting 503.
        later = open_request(server, SHORT)
        try:
            wait_for_metric(server, "lmserve:num_http_requests_waiting", 1)
        finally:
            later.close()
    finally:
        running.close()
    wait_for_metric(server, "lmserve:num_http_requests_running", 0)
    wait_for_metric(server, "lmserve:num_http_requests_waiting", 0)


def test_every_generation_route_is_admitted_and_interactive_ends_never_wait(server):
    running = open_request(server, LONG_STREAM)
    waiting = None
    try:
        read_until(running, b"data: ")  # it holds the only slot
        waiting = open_request(server, SHORT)
        wait_for_metric(server, "lmserve:num_http_requests_waiting", 1)  # the queue is full
        for path, body in [
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
            ("/v1/completions", SHORT),
            ("/v1/chat/interactive", {"prompt": "x", "session_id": 5, "interactive_mode": True}),
        ]:
            refused = httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=30)
            assert_error(refused, 503)
            assert refused.headers["retry-after"] == "1", path
        # Cancels and ends of interactive sessions never wait for admission (with API keys, one
        # of a session the key does not hold is a 404, answered at once like the rest).
        for body in [{"prompt": "", "session_id": 5, "request_output_len": 0, "interactive_mode": False},
                     {"prompt": "", "session_id": 5, "cancel": True}]:
            reply = httpx.post(server.base_url + "/v1/chat/interactive", json=body, headers=AUTH, timeout=30)
            assert reply.status_code == 404 and reply.json()["message"] == "No session 5.", reply.text
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    wait_for_metric(server, "lmserve:num_http_requests_running", 0)
    wait_for_metric(server, "lmserve:num_http_requests_waiting", 0)


def test_an_admitted_handler_holds_its_slot_until_it_returns():
    queue = AdmissionQueue(max_running=1, max_waiting=0)
    request = SimpleNamespace(app=SimpleNamespace(ctx=SimpleNamespace(admission=queue)), body=b"{}")

    @admitted
    async def handler(request, name):
        if name == "outer":  # a second request while this one holds the only slot, with no place to wait
            busy = await handler(request, "inner")
            assert busy.status == 503 and busy.headers["retry-after"] == "1"
        return f"{name}: {queue.num_running} running"

    assert asyncio.run(handler(request, "outer")) == "outer: 1 running"
    assert queue.num_running == 0 and queue.num_rejected == 1


def test_a_route_flagged_ctx_generation_stops_the_start_up():
    """``ctx_generation=True`` used to admit a route; now a route is declared @admitted, and
    the old flag is refused rather than served without limits."""
    app = Sanic("operations_ctx_generation")

    async def handler(request):
        pass

    app.add_route(handler, "/plain", methods=["POST"], name="plain")
    refuse_generation_flags(app)  # nothing flagged
    app.add_route(handler, "/generate", methods=["POST"], name="generate", ctx_generation=True)
    with pytest.raises(PluginError, match="generate.*ctx_generation=True.*admitted"):
        refuse_generation_flags(app)


def test_admission_queue_hands_slots_over_in_order():
    async def scenario():
        queue = AdmissionQueue(max_running=1, max_waiting=2)
        assert await queue.acquire()
        first = asyncio.create_task(queue.acquire())
        second = asyncio.create_task(queue.acquire())
        await asyncio.sleep(0)
        assert queue.num_waiting == 2 and not await queue.acquire()  # full: refused at once
        assert queue.num_rejected == 1
        queue.release()
        assert await first and not second.done()
        assert queue.num_running == 1 and queue.num_waiting == 1
        second.cancel()  # a waiter that leaves
        with pytest.raises(asyncio.CancelledError):
            await second
        assert queue.num_waiting == 0
        queue.release()
        assert queue.num_running == 0

        # A slot handed over just as its waiter is cancelled goes back, not lost.
        assert await queue.acquire()
        third = asyncio.create_task(queue.acquire())
        await asyncio.sleep(0)
        queue.release()  # resolves third's future...
        third.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await third
        assert queue.num_running == 0 and queue.num_waiting == 0

    asyncio.run(scenario())


def test_admission_weighs_a_request_by_its_choices_and_nobody_overtakes_a_heavy_head():
    async def scenario():
        queue = AdmissionQueue(max_running=4, max_waiting=4)
        assert await queue.acquire(3)
        heavy = asyncio.create_task(queue.acquire(2))  # 3 + 2 > 4: it waits
        light = asyncio.create_task(queue.acquire(1))  # would fit, but may not pass the heavy one
        await asyncio.sleep(0)
        assert not heavy.done() and not light.done() and queue.num_waiting == 2
        queue.release(3)
        assert await heavy and await light
        assert queue.num_running == 2 and queue.num_running_weight == 3
        # A heavy waiter that leaves lets the lighter ones behind it in.
        blocker = asyncio.create_task(queue.acquire(4))
        behind = asyncio.create_task(queue.acquire(1))
        await asyncio.sleep(0)
        assert not behind.done()
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        assert await behind and queue.num_running_weight == 4

    asyncio.run(scenario())


@pytest.mark.parametrize(("body", "weight"), [
    ({"messages": [{"role": "user", "content": "x"}]}, 1),
    ({"messages": [], "n": 64}, 64),
    ({"prompt": ["a", "b", "c"], "n": 2}, 6),
    ({"prompt": [[1, 2], [3]]}, 2),
    ({"prompt": [1, 2, 3], "n": 3}, 3),  # one prompt of token ids
    ({"prompt": "x", "n": "lots"}, 1),  # invalid: the handler says so
    ([1, 2], 1),
])
def test_a_request_weighs_its_choices_times_its_prompts(body, weight):
    assert request_weight(body) == weight


def test_a_request_heavier_than_the_whole_budget_is_a_400_naming_n():
    queue = AdmissionQueue(max_running=8, max_waiting=0)
    ran = []

    @admitted
    async def handler(request):
        ran.append(request)

    def request(body):
        return SimpleNamespace(app=SimpleNamespace(ctx=SimpleNamespace(admission=queue)), body=json.dumps(body).encode())

    reply = asyncio.run(handler(request({"prompt": "x", "n": 9})))
    assert reply.status == 400 and json.loads(reply.body)["error"]["param"] == "n"
    assert "9 generations" in json.loads(reply.body)["error"]["message"]
    asyncio.run(handler(request({"prompt": ["x"] * 4, "n": 2})))  # exactly the budget: runs
    assert len(ran) == 1 and queue.num_running == 0 and queue.num_running_weight == 0


def test_without_a_limit_everyone_is_admitted():
    async def scenario():
        queue = AdmissionQueue(max_running=None)
        assert all([await queue.acquire() for _ in range(100)])
        assert queue.num_running == 100 and queue.num_waiting == 0

    asyncio.run(scenario())


# ------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests must be at least 1"),
    (["--max-concurrent-requests", "2", "--max-queued-requests", "-1"], "--max-queued-requests must be at least 0"),
    (["--max-queued-requests", "3"], "--max-queued-requests needs --max-concurrent-requests"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be at least 1"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be at least 0"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be at least 0"),
    (["--api-keys", ""], "--api-keys: a key must be non-empty"),
    (["--api-keys", "a b"], "--api-keys: a key must be non-empty"),
    (["--allow-origins", "example.com"], "--allow-origins: 'example.com' is not"),
])
def test_bad_flag_values_exit_2_before_loading(flags, message, capsys):
    assert main(["serve", "api_server", "/nonexistent/model", *flags]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------- CORS, in-process


def preflight(policy, origin=ORIGIN, method="POST", headers=None):
    request = SimpleNamespace(headers={"origin": origin, "access-control-request-method": method,
                                       **({"access-control-request-headers": headers} if headers else {})})
    return policy.preflight(request)


def test_cors_policy_limits_methods_and_headers_and_never_echoes_odd_bytes():
    policy = CORSPolicy((ORIGIN,), ("GET", "POST"), ("authorization",), credentials=False)
    assert preflight(policy, method="post").status == 204
    assert preflight(policy, method="DELETE").status == 400
    assert preflight(policy, headers="Authorization").status == 204
    assert preflight(policy, headers="authorization, x-other").status == 400
    anything = CORSPolicy(("*",), ("*",), ("*",), credentials=True)
    ok = preflight(anything, origin="https://any.example", headers="x-a, x-b")
    assert ok.headers["access-control-allow-origin"] == "https://any.example"  # credentials: never "*"
    assert ok.headers["access-control-allow-headers"] == "x-a, x-b"
    assert preflight(anything, origin="https://\udcff.example").status == 400
    assert preflight(anything, headers="x-\udcff").status == 400
    assert CORSPolicy(("*",), ("*",), ("*",), credentials=False).origin_headers("https://a.example") == {
        "Access-Control-Allow-Origin": "*"}


def test_api_keys_from_the_environment(tiny_model_dir):
    """$LMSERVE_API_KEYS keeps keys out of the process list."""
    from conftest import LiveServer

    server = LiveServer(tiny_model_dir, "--model-name", "tiny", env={"LMSERVE_API_KEYS": "env-one, env-two"})
    try:
        assert "env-one" not in " ".join(server.process.args)
        url = server.base_url + "/v1/models"
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer env-two"}, timeout=30).status_code == 200
    finally:
        server.stop()
