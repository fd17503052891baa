"""While the model loads, the port answers 503 (not a refused connection); then the server takes over."""

import socket
import subprocess
import time

import httpx

from conftest import LMSERVE, free_port


def test_health_is_503_while_loading_then_200(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen([*LMSERVE, "serve", "api_server", str(tiny_model_dir), "--server-name", "127.0.0.1",
                                "--server-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    statuses = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 200 not in statuses:
            assert process.poll() is None, "the server exited"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"] and response.json()["error"]["code"] == 503
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(30)
    assert statuses[0] == 503, "the first answer came while loading"
    assert statuses[-1] == 200 and set(statuses) <= {503, 200}


def test_a_port_in_use_is_one_clear_error(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*LMSERVE, "serve", "api_server", str(tiny_model_dir), "--server-name", "127.0.0.1",
                                 "--server-port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
