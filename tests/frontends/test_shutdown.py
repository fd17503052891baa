"""SIGTERM: the server stops accepting, lets in-flight requests finish for up to
--shutdown-timeout seconds, cuts the rest (a stream ends with an error event and
``[DONE]``) and exits with status 0."""

import json
import signal
import socket
import time

import httpx


def start_stream(server, max_tokens: int) -> tuple[socket.socket, bytes]:
    """A raw keep-alive connection streaming a completion; returns it once tokens flow."""
    data = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    received = b""
    while b"data: {" not in received:
        received += sock.recv(65536)
    return sock, received


def read_to_close(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes the connection, and when that happened."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic()


def test_sigterm_lets_a_stream_finish_then_exits_0(long_model_dir):
    from conftest import LiveServer

    server = LiveServer(long_model_dir, "--model-name", "tiny", "--shutdown-timeout", "120")
    try:
        sock, head = start_stream(server, max_tokens=400)
        server.process.send_signal(signal.SIGTERM)
        # The listening socket closes at once, while the stream goes on.
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(server.base_url + "/health", timeout=1)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.05)
        # The stream completes...
        sock.settimeout(60)
        body = head
        while not body.endswith(b"\r\n0\r\n\r\n"):  # the last chunk
            chunk = sock.recv(65536)
            assert chunk, f"the stream was cut: {body[-300:]!r}"
            body += chunk
        assert b"data: [DONE]" in body and b'"completion_tokens":400' in body
        # ...then the server closes the keep-alive connection itself, long before
        # Sanic's 5 s keep-alive timeout would, and exits.
        ended = time.monotonic()
        rest, closed = read_to_close(sock, timeout=10)
        assert rest == b"" and closed - ended < 3
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_sigterm_aborts_what_outlasts_the_timeout(long_model_dir):
    from conftest import LiveServer

    server = LiveServer(long_model_dir, "--model-name", "tiny", "--shutdown-timeout", "1")
    try:
        sock, _ = start_stream(server, max_tokens=30000)  # minutes of decoding
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest, closed = read_to_close(sock, timeout=30)
        assert b'"usage":{' not in rest  # cut off, not finished...
        # ...and told so: an error event, [DONE], and the chunked body's last chunk.
        assert rest.endswith(b'"code":503}\n\ndata: [DONE]\n\n\r\n0\r\n\r\n'), rest[-400:]
        assert 0.9 < closed - signalled < 10
        assert server.process.wait(timeout=30) == 0
        assert "Task was destroyed but it is pending" not in server.log()
    finally:
        server.stop()
