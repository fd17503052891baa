"""Hostile or careless clients at the HTTP edge: deep JSON, slow clients, long responses, shutdown.

The reproductions: a body of 1,000 ``[`` was a 500 (RecursionError) on every JSON
route; headers trickled a byte at a time, or a body that stopped half way, held a
connection for ever; nothing bounded how long a response could run; and a stream
cut at shutdown just stopped, with no error and no ``[DONE]``.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import time

import httpx
import pytest

from conftest import LiveServer

from lmserve.frontends.http.parsing import MAX_JSON_DEPTH, json_depth

REQUEST_TIMEOUT_S = 2
RESPONSE_TIMEOUT_S = 2
LONG = 30000  # tokens: minutes of decoding on the tiny model


@pytest.fixture(scope="module")
def slow_client_server(long_model_dir):
    server = LiveServer(long_model_dir, "--model-name", "tiny", "--request-timeout", str(REQUEST_TIMEOUT_S))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def timed_server(long_model_dir):
    server = LiveServer(long_model_dir, "--model-name", "tiny", "--response-timeout", str(RESPONSE_TIMEOUT_S))
    yield server
    server.stop()


def assert_error_body(body: dict, status: int) -> str:
    """``body`` is OpenAI's error shape with LMDeploy's top-level copy; its message."""
    assert body["object"] == "error"
    for where in (body["error"], body):
        assert where["code"] == status and where["message"]
    return body["message"]


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_until_closed(sock: socket.socket, started: float, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and after how many
    seconds from ``started`` it did; fails past ``limit`` seconds."""
    received = b""
    while True:
        left = started + limit - time.monotonic()
        assert left > 0, f"the connection is still open after {limit} s: {received[:300]!r}"
        if select.select([sock], [], [], left)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return received, time.monotonic() - started
            received += chunk


def trickle_until_closed(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``data`` one byte per ``interval`` seconds until the server closes the
    connection: what it said, and after how many seconds (fails past ``limit``)."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed already
            break
        pause_until = time.monotonic() + interval
        while (left := pause_until - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                return read_until_closed(sock, started, limit)
        assert time.monotonic() - started < limit, f"the connection is still open after {limit} s"
    return read_until_closed(sock, started, limit)


def response_of(raw: bytes) -> tuple[int, dict]:
    """The status and JSON body of one raw HTTP/1.1 response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def metrics(server) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lmserve:") and "_bucket{" not in line:
            values[line.split("{", 1)[0].split(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values


def wait_for_idle_engine(server, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (current := metrics(server))["lmserve:num_requests_running"] != 0:
        assert time.monotonic() < deadline, f"the engine still computes after {timeout} s: {current}"
        time.sleep(0.05)
    return current


# ----------------------------------------------------------------------------- deep JSON


def json_routes(server) -> list[str]:
    """Every route that takes a JSON body, as /openapi.json lists them."""
    document = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    return sorted(path for path, operations in document["paths"].items()
                  if "application/json" in operations.get("post", {}).get("requestBody", {}).get("content", {}))


DEEP_BODIES = {
    "arrays": b"[" * 1000,
    "objects": b'{"a":' * 1000,
    "closed-arrays": b"[" * 1000 + b"]" * 1000,
    "inside-a-request": b'{"model": "tiny", "prompt": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}",
}


@pytest.mark.parametrize("shape", DEEP_BODIES)
def test_deeply_nested_json_is_a_400_on_every_json_route(tiny_server, shape):
    routes = json_routes(tiny_server)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/tokenize", "/detokenize",
            "/v1/encode"} <= set(routes)
    for path in routes:
        response = httpx.post(tiny_server.base_url + path, content=DEEP_BODIES[shape],
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, (path, response.text)
        message = assert_error_body(response.json(), 400)
        assert message == f"The body nests deeper than {MAX_JSON_DEPTH} levels.", (path, message)
    assert httpx.get(tiny_server.base_url + "/health", timeout=10).status_code == 200


def test_a_body_at_the_depth_limit_is_parsed_and_one_level_more_is_refused(tiny_server):
    def nested(depth: int) -> bytes:  # the prompt holds depth - 1 levels of lists
        return b'{"model": "tiny", "prompt": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"

    at_limit = httpx.post(tiny_server.base_url + "/v1/completions", content=nested(MAX_JSON_DEPTH),
                          headers={"Content-Type": "application/json"}, timeout=30)
    over = httpx.post(tiny_server.base_url + "/v1/completions", content=nested(MAX_JSON_DEPTH + 1),
                      headers={"Content-Type": "application/json"}, timeout=30)
    # At the limit the body is parsed: its prompt is wrong (not the nesting), and says so.
    assert at_limit.status_code == 400 and assert_error_body(at_limit.json(), 400).startswith("prompt")
    assert over.status_code == 400 and "nests deeper" in assert_error_body(over.json(), 400)


def test_a_deep_json_schema_in_a_real_request_fits_the_limit(tiny_server):
    schema: dict = {"type": "string"}
    for _ in range(10):  # ten objects deep
        schema = {"type": "object", "properties": {"inner": schema}, "required": ["inner"]}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}}
    assert json_depth(json.dumps(body).encode()) < MAX_JSON_DEPTH // 2
    response = httpx.post(tiny_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("text, depth", [
    (b"1", 0),
    (b"", 0),
    (b"[[1, [2]], {}]", 3),
    (b'{"a": "[[[[{{{{"}', 1),  # brackets in a string are text
    (rb'["\"[[[", [[]]]', 3),  # an escaped quote does not end the string
    (rb'["\\", [[]]]', 3),  # an escaped backslash does not escape the quote after it
    (rb'["\\\"[[", []]', 2),
])
def test_json_depth_counts_only_the_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


# --------------------------------------------------------------------------- slow clients


def test_headers_trickled_a_byte_a_second_are_cut_at_the_request_timeout(slow_client_server):
    sock = connect(slow_client_server)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        header = b"Host: test\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 100
        said, closed_after = trickle_until_closed(sock, header, interval=1.0, limit=REQUEST_TIMEOUT_S + 4)
    finally:
        sock.close()
    # Each byte came within the timeout: only a deadline for the whole headers closes it.
    assert REQUEST_TIMEOUT_S - 0.5 < closed_after < REQUEST_TIMEOUT_S + 3
    status, body = response_of(said)
    assert status == 408 and "headers took longer" in assert_error_body(body, 408)


def test_a_body_that_stops_half_way_is_cut_at_the_request_timeout(slow_client_server):
    sock = connect(slow_client_server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"model": "tiny", "prompt": "')
        said, closed_after = read_until_closed(sock, time.monotonic(), limit=REQUEST_TIMEOUT_S + 4)
    finally:
        sock.close()
    assert REQUEST_TIMEOUT_S - 0.5 < closed_after < REQUEST_TIMEOUT_S + 3
    status, body = response_of(said)
    assert status == 408 and "body paused" in assert_error_body(body, 408)


def test_a_connection_that_sends_nothing_is_closed_at_the_request_timeout(slow_client_server):
    sock = connect(slow_client_server)
    try:
        said, closed_after = read_until_closed(sock, time.monotonic(), limit=REQUEST_TIMEOUT_S + 4)
    finally:
        sock.close()
    assert said == b"" and REQUEST_TIMEOUT_S - 0.5 < closed_after < REQUEST_TIMEOUT_S + 3


def test_a_slow_but_steady_body_is_served(slow_client_server):
    body = json.dumps({"model": "tiny", "prompt": "hello there"}).encode()
    pieces = [body[i:i + 8] for i in range(0, len(body), 8)]
    sock = connect(slow_client_server)
    try:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        for piece in pieces:  # a piece every second: well over the timeout in all, never a long pause
            time.sleep(1.0)
            sock.sendall(piece)
        assert time.monotonic() - started > 2 * REQUEST_TIMEOUT_S
        said = sock.recv(65536)
    finally:
        sock.close()
    assert said.startswith(b"HTTP/1.1 200"), said[:300]


def test_an_idle_keep_alive_connection_outlives_the_request_timeout(slow_client_server):
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    sock = connect(slow_client_server)
    try:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(2 * REQUEST_TIMEOUT_S)  # idle: Sanic's keep-alive timeout (far longer) applies
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()


def test_a_long_stream_outlives_the_request_timeout(slow_client_server):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", slow_client_server.base_url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        started = time.monotonic()
        for line in response.iter_lines():
            if line:
                events.append(line)
            if time.monotonic() - started > 2.5 * REQUEST_TIMEOUT_S:
                break  # leaving aborts it
    assert all(json.loads(event[len("data: "):])["choices"][0]["finish_reason"] is None for event in events)
    assert len(events) > 10


# -------------------------------------------------------------------------- response timeout


def test_a_stream_past_the_response_timeout_ends_with_an_error_event_and_done(timed_server):
    before = wait_for_idle_engine(timed_server, timeout=30)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": LONG,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    events = []
    with httpx.stream("POST", timed_server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            events += [line] if line else []
            assert time.monotonic() - started < RESPONSE_TIMEOUT_S + 5, "the stream runs past the response timeout"
    assert time.monotonic() - started > RESPONSE_TIMEOUT_S - 0.5
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])
    assert "response took longer" in assert_error_body(error, 504)
    assert len(events) > 3  # tokens flowed before the cut
    # The engine stopped computing it (it would run for minutes).
    after = wait_for_idle_engine(timed_server, timeout=5)
    assert after["lmserve:generation_tokens_total"] - before["lmserve:generation_tokens_total"] < LONG / 2


def test_an_interactive_stream_past_the_response_timeout_ends_with_an_error_line_and_keeps_its_history(
        timed_server):
    wait_for_idle_engine(timed_server, timeout=30)
    body = {"prompt": "x", "session_id": 4242, "interactive_mode": True, "request_output_len": LONG,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", timed_server.base_url + "/v1/chat/interactive", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    last = lines[-1]
    assert last["finish_reason"] == "error" and "response took longer" in last["error"]
    assert last["tokens"] == lines[-2]["tokens"] > 0  # what it generated before the cut
    wait_for_idle_engine(timed_server, timeout=5)
    # The turn kept what it sent, as a cancel does: the next turn starts after it.
    reply = httpx.post(timed_server.base_url + "/v1/chat/interactive", json={
        "prompt": "y", "session_id": 4242, "interactive_mode": False, "request_output_len": 1}, timeout=30).json()
    assert reply["history_tokens"] > last["tokens"]


def test_a_response_past_the_response_timeout_is_a_504(timed_server):
    before = wait_for_idle_engine(timed_server, timeout=30)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": LONG, "ignore_eos": True}
    started = time.monotonic()
    response = httpx.post(timed_server.base_url + "/v1/completions", json=body, timeout=30)
    assert time.monotonic() - started < RESPONSE_TIMEOUT_S + 5
    assert response.status_code == 504
    assert "response took longer" in assert_error_body(response.json(), 504)
    after = wait_for_idle_engine(timed_server, timeout=5)
    assert after["lmserve:generation_tokens_total"] - before["lmserve:generation_tokens_total"] < LONG / 2


def test_the_response_timeout_counts_per_request_not_per_connection(timed_server):
    with httpx.Client(base_url=timed_server.base_url, timeout=30) as client:  # one keep-alive connection
        started = time.monotonic()
        while time.monotonic() - started < 2 * RESPONSE_TIMEOUT_S:
            response = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4})
            assert response.status_code == 200, response.text
            time.sleep(0.5)


# ----------------------------------------------------------------------------------- shutdown


def test_a_stream_cut_by_shutdown_ends_with_an_error_event_and_done(long_model_dir):
    server = LiveServer(long_model_dir, "--model-name", "tiny", "--shutdown-timeout", "1")
    try:
        data = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": LONG, "ignore_eos": True,
                           "stream": True}).encode()
        stream = connect(server)
        stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(data) + data)
        head = b""
        while b"data: {" not in head:
            head += stream.recv(65536)
        data = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": LONG, "ignore_eos": True}).encode()
        waiting = connect(server)  # a non-streaming request in flight too
        waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(data) + data)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest, _ = read_until_closed(stream, signalled, limit=15)
        answer, _ = read_until_closed(waiting, signalled, limit=15)
        # The chunked body ends properly, on an error event then [DONE].
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), rest[-400:]
        last_event = rest.rsplit(b"data: {", 1)[1].split(b"\n\n", 1)[0]
        assert "shutting down" in assert_error_body(json.loads(b"{" + last_event), 503)
        status, body = response_of(answer)
        assert status == 503 and "shutting down" in assert_error_body(body, 503)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
