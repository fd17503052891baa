"""``lmserve serve ray --address``: the ingress joins a cluster started with ``ray start --head``.

A module of its own: ``ray stop`` at the end stops every Ray process of this machine.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmserve.plugins.pytest_plugin import LiveServer, free_port

RAY = str(Path(sys.executable).with_name("ray"))


def ray_env() -> dict:
    """The head starts with Ray's token authentication on (its default); a client here
    sends the token Ray saved once in token mode."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    saved = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or saved.is_file()):  # a machine where Ray never saved one
        monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # the head, the ingress and the client read it
    port = free_port()
    env = ray_env()
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, timeout=180, env=env, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], timeout=120, env=env, capture_output=True)


def test_the_ingress_joins_a_running_cluster_and_deletes_its_app_when_it_stops(ray_head, tiny_model_dir, tmp_path):
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--address", ray_head, "--num-replicas", "1",
                        "--cache-max-entry-count", "16", "--app-name", "joined", server="ray", log_dir=tmp_path,
                        startup_timeout=300)
    try:
        assert "(joined)" in server.log()
        response = httpx.post(server.base_url + "/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.headers["x-lmserve-replica"]
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log()
    code = ("import sys, ray; from ray import serve; "
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sorted(serve.status().applications))")
    status = subprocess.run([sys.executable, "-c", code, ray_head], capture_output=True, text=True, timeout=120,
                            env=ray_env())
    assert status.returncode == 0, status.stderr
    assert "joined" not in status.stdout, "the app outlived its ingress"
