"""``lmserve serve ray``: two replicas of the tiny model on a local Ray cluster, through the ingress.

One server for the module (Ray and two engines take about a minute to start).
The tests run in file order: the last one kills a replica.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lmserve.backends.ray.router import rendezvous_order
from lmserve.frontends.api_client import APIClient
from lmserve.plugins.pytest_plugin import LiveServer

HEADER = "x-lmserve-replica"
MODEL = "tiny"
TURNS = 4


@pytest.fixture(scope="module")
def ray_server(long_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ray-server")
    server = LiveServer(long_model_dir, "--model-name", MODEL, "--num-replicas", "2", "--ray-num-cpus", "2",
                        "--num-cpus-per-replica", "1", "--cache-max-entry-count", "64", "--log-level", "INFO",
                        server="ray", log_dir=log_dir, startup_timeout=300)
    yield server
    server.stop()


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers[HEADER]


def completion_replicas(server, count: int) -> list[str]:
    with server.client() as client:
        return [replica_of(client.post("/v1/completions", json={"model": MODEL, "prompt": f"n {i}",
                                                                   "max_tokens": 1}))
                for i in range(count)]


def turn(client: httpx.Client, session_id: int, prompt: str, status: int = 200) -> httpx.Response:
    response = client.post("/v1/chat/interactive", json={
        "prompt": prompt, "session_id": session_id, "interactive_mode": True, "request_output_len": 3,
        "temperature": 0})
    assert response.status_code == status, response.text
    return response


def sessions_spread_over(replicas: list[str], count: int, start: int = 1) -> dict[int, str]:
    """``count`` session ids from ``start`` up, half placed on each of two replicas by the
    rendezvous rule, with the replica each must land on."""
    wanted = {replica: count // len(replicas) for replica in replicas}
    chosen: dict[int, str] = {}
    session_id = start
    while len(chosen) < count:
        winner = rendezvous_order(f"session-{session_id}", replicas)[0]
        if wanted[winner] > 0:
            wanted[winner] -= 1
            chosen[session_id] = winner
        session_id += 1
    return chosen


def test_the_openai_client_works_through_the_ingress(ray_server):
    client = openai.OpenAI(base_url=ray_server.base_url + "/v1", api_key="none")
    assert [model.id for model in client.models.list()] == [MODEL]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    completion = raw.parse()
    assert 0 < completion.usage.completion_tokens <= 4
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert raw.headers[HEADER]
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
            stream=True) as streamed:
        assert streamed.headers[HEADER]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed.parse() if chunk.choices)
    assert text == completion.choices[0].message.content  # greedy: the same on either replica


def test_the_api_client_works_through_the_ingress(ray_server):
    client = APIClient(ray_server.base_url)
    assert client.available_models == [MODEL]
    replies = list(client.chat_interactive_v1("hello", session_id=999, interactive_mode=True, request_output_len=3,
                                             temperature=0))
    assert replies[-1]["history_tokens"] == 0 and replies[-1]["tokens"] > 0
    second = list(client.chat_interactive_v1("again", session_id=999, interactive_mode=True, request_output_len=3,
                                             temperature=0))
    assert second[-1]["history_tokens"] == replies[-1]["input_tokens"] + replies[-1]["tokens"]
    list(client.chat_interactive_v1("", session_id=999, interactive_mode=False, request_output_len=0))


def test_requests_without_a_session_spread_over_both_replicas(ray_server):
    assert len(set(completion_replicas(ray_server, 20))) == 2


def test_sessions_stay_on_their_replica_with_exact_history(ray_server):
    replicas = sorted(set(completion_replicas(ray_server, 20)))
    sessions = sessions_spread_over(replicas, 8)
    history = dict.fromkeys(sessions, 0)
    with ray_server.client() as client:
        for turn_index in range(TURNS):
            for session_id, replica in sessions.items():
                reply = turn(client, session_id, f"turn {turn_index} of {session_id}")
                assert replica_of(reply) == replica, f"session {session_id} left its replica"
                body = reply.json()
                assert body["history_tokens"] == history[session_id]
                history[session_id] += body["input_tokens"] + body["tokens"]
    assert set(sessions.values()) == set(replicas)


def test_a_cancel_stops_the_turn_on_its_replica_and_keeps_what_was_streamed(ray_server):
    lines, answered = [], []
    some_arrived = threading.Event()
    body = {"prompt": "talk for a long time", "session_id": 4242, "interactive_mode": True, "stream": True,
            "request_output_len": 3000, "ignore_eos": True}

    def read() -> None:
        try:
            with httpx.stream("POST", ray_server.base_url + "/v1/chat/interactive", json=body, timeout=60) as reply:
                answered.append(reply)
                for line in reply.iter_lines():
                    if line.strip():
                        lines.append(json.loads(line))
                        if len(lines) >= 3:
                            some_arrived.set()
        finally:
            some_arrived.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert some_arrived.wait(60) and len(lines) >= 3, (answered, lines)
    with ray_server.client() as client:
        cancel = client.post("/v1/chat/interactive", json={"prompt": "", "session_id": 4242, "interactive_mode": True,
                                                            "cancel": True})
        assert cancel.status_code == 200, cancel.text
        reader.join(30)
        assert not reader.is_alive(), "the stream went on after the cancel"
        assert lines[-1]["finish_reason"] == "abort", lines[-1]
        streamed = lines[-1]["tokens"]
        assert 3 <= streamed < 3000
        after = turn(client, 4242, "go on")
        assert replica_of(after) == answered[0].headers[HEADER], "the session stayed on its replica"
        assert after.json()["history_tokens"] == lines[0]["input_tokens"] + streamed


def test_a_killed_replica_loses_its_sessions_only(ray_server, tmp_path):
    replicas = sorted(set(completion_replicas(ray_server, 20)))
    sessions = sessions_spread_over(replicas, 8, start=100)
    history = {}
    with ray_server.client() as client:
        for session_id in sessions:
            body = turn(client, session_id, "first").json()
            history[session_id] = body["input_tokens"] + body["tokens"]

        victim, survivor = replicas
        kill_replica(ray_server, victim, tmp_path)
        for session_id, replica in sessions.items():
            if replica == victim:
                error = turn(client, session_id, "second", status=410).json()["error"]
                assert f"Session {session_id} was lost" in error["message"] and error["param"] == "session_id"
            else:
                reply = turn(client, session_id, "second")
                assert replica_of(reply) == survivor
                assert reply.json()["history_tokens"] == history[session_id]

        # Serve starts a replacement; it takes new sessions (and a lost session's id starts afresh).
        deadline = time.monotonic() + 120
        while not (set(completion_replicas(ray_server, 4)) - set(replicas)):
            assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        (replacement,) = set(completion_replicas(ray_server, 20)) - {survivor}
        live = [survivor, replacement]
        new_session = next(s for s in range(1000, 2000) if rendezvous_order(f"session-{s}", live)[0] == replacement)
        assert replica_of(turn(client, new_session, "hi")) == replacement
        lost = next(s for s, replica in sessions.items() if replica == victim)
        assert turn(client, lost, "again").json()["history_tokens"] == 0


def kill_replica(server, replica_id: str, tmp_path: Path) -> None:
    """Kill the replica's actor through Ray's own API, from another driver on the cluster."""
    address = re.search(r"Ray cluster at (\S+)", server.log()).group(1)
    script = tmp_path / "kill_replica.py"
    script.write_text(
        "import sys, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "ray.kill(ray.get_actor(f'SERVE_REPLICA::lmserve#engine#{sys.argv[2]}', namespace='serve'), no_restart=True)\n"
    )
    # The cluster the server started asks for the token Ray saved for it.
    subprocess.run([sys.executable, str(script), address, replica_id], check=True, timeout=120,
                   env={**os.environ, "RAY_AUTH_MODE": "token"})
