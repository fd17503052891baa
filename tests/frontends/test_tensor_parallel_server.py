"""``lmserve serve api_server MODEL --tp N`` as users start it: answers, refusals, a dying rank, two nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lmserve.plugins.pytest_plugin import LMSERVE, free_port

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
        "temperature": 0, "ignore_eos": True}


def chat(server, **changes) -> str:
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={**CHAT, **changes})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def rank_pids(server_pid: int) -> list[int]:
    """The server's spawned rank processes."""
    # Each thread's children are listed under that thread (the engine thread spawns the ranks).
    children = [pid for task in Path(f"/proc/{server_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def exit_code_within(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def one_rank_answer(lmserve_server):
    return chat(lmserve_server)


def test_two_ranks_answer_as_one_does(lmserve_server_factory, one_rank_answer):
    server = lmserve_server_factory("--model-name", "tiny", "--tp", "2")
    try:
        assert len(rank_pids(server.process.pid)) == 1
        assert chat(server) == one_rank_answer
        with server.client() as client, client.stream("POST", "/v1/chat/completions",
                                                      json={**CHAT, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == one_rank_answer
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_a_size_that_does_not_split_the_heads_exits_2_naming_the_valid_ones(lmserve_tiny_model_dir):
    result = subprocess.run([*LMSERVE, "serve", "api_server", str(lmserve_tiny_model_dir), "--tp", "3",
                             "--server-port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--tp 3 does not split this model's 4 attention heads and 2 key/value heads evenly; " \
           "valid sizes: 1, 2, 4." in result.stderr


def test_a_killed_rank_ends_the_streams_with_an_error_and_the_server_exits(lmserve_server_factory):
    server = lmserve_server_factory("--model-name", "tiny", "--tp", "2")
    (rank,) = rank_pids(server.process.pid)
    events = []
    with server.client() as client, client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True}) as response:
        for line in response.iter_lines():
            if line:
                events.append(line)
            if len(events) == 3:
                os.kill(rank, signal.SIGKILL)
                killed = time.monotonic()
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "The engine failed" in events[-2], events[-2]
    assert exit_code_within(server.process, 10 - (time.monotonic() - killed)) == 1, server.log()
    assert "the engine failed: rank 1" in server.log()


def test_two_nodes_on_one_machine_serve_one_model(lmserve_server_factory, lmserve_tiny_model_dir, one_rank_answer,
                                                  tmp_path):
    master_port = str(free_port())
    nodes = ["--tp", "2", "--nnodes", "2", "--master-port", master_port]
    with open(tmp_path / "node-1.log", "w") as log:
        node_1 = subprocess.Popen([*LMSERVE, "serve", "api_server", str(lmserve_tiny_model_dir), *nodes,
                                   "--node-rank", "1", "--server-port", str(free_port()), "--dtype", "float32",
                                   "--quantization", "none", "--enforce-eager"], stdout=log, stderr=subprocess.STDOUT)
    try:
        node_0 = lmserve_server_factory("--model-name", "tiny", *nodes, "--node-rank", "0")
        assert rank_pids(node_0.process.pid) == []  # its one rank is the server itself
        assert chat(node_0) == one_rank_answer
        node_0.stop()
        assert node_0.process.returncode == 0
        assert exit_code_within(node_1, 30) == 0, (tmp_path / "node-1.log").read_text()
    finally:
        if node_1.poll() is None:
            node_1.kill()
            node_1.wait()


def test_a_stuck_rank_fails_the_streams_after_the_timeout_and_the_server_exits(lmserve_server_factory):
    server = lmserve_server_factory("--model-name", "tiny", "--tp", "2", "--tp-timeout", "2")
    (rank,) = rank_pids(server.process.pid)
    events = []
    try:
        with server.client() as client, client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 3:
                    os.kill(rank, signal.SIGSTOP)  # alive, but never reaches the next collective
                    stopped = time.monotonic()
        assert '"error"' in events[-2] and "did not reach" in events[-2], events[-2]
        assert time.monotonic() - stopped < 10
        assert exit_code_within(server.process, 15) == 1, server.log()
        assert not Path(f"/proc/{rank}").exists()  # the stuck rank was ended too
    finally:
        if Path(f"/proc/{rank}").exists():
            os.kill(rank, signal.SIGKILL)
