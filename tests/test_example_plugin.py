"""The example third-party plugin (examples/lmserve-hello-plugin), installed with pip, end to end.

The package is installed into a folder of its own, and that folder is put on
``PYTHONPATH`` only for the subprocesses started here: lmserve's other test
servers never load it.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from conftest import LMSERVE, REPO_ROOT, LiveServer

EXAMPLE = REPO_ROOT / "examples" / "lmserve-hello-plugin"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def example_env(tmp_path_factory) -> dict:
    """Environment variables under which Python finds the installed example.

    pip builds from a copy: an in-tree build would leave build/ and egg-info
    folders in the repository.
    """
    scratch = tmp_path_factory.mktemp("hello-plugin")
    source = scratch / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = scratch / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def hello_server(tiny_model_dir, example_env, tmp_path_factory):
    """A server with the example loaded, its template chosen, logging finished requests to a file."""
    log = tmp_path_factory.mktemp("hello-log") / "requests.jsonl"
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--chat-template", "hello",
                        "--hello-log", str(log), env=example_env)
    server.request_log = log
    yield server
    server.stop()


def test_lmserve_plugins_lists_it_with_its_hooks(example_env):
    listing = subprocess.run([*LMSERVE, "plugins", "--json"], capture_output=True, text=True, check=True,
                             env={**os.environ, **example_env})
    [hello] = [plugin for plugin in json.loads(listing.stdout) if plugin["name"] == "hello"]
    assert hello["source"] == "entry point of lmserve-hello-plugin"
    assert {"lmserve_chat_templates", "lmserve_register_routes", "lmserve_request_finished"} <= set(hello["hooks"])


def test_its_route_answers_with_the_served_model(hello_server):
    reply = httpx.get(hello_server.base_url + "/hello", timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"hello": "world", "model": "tiny"}


def test_chats_are_rendered_by_its_template(hello_server):
    tokens = httpx.post(hello_server.base_url + "/tokenize", json={"messages": CHAT}, timeout=10).json()["tokens"]
    prompt = httpx.post(hello_server.base_url + "/detokenize", json={"tokens": tokens}, timeout=10).json()["prompt"]
    assert prompt == "### System:\nBe brief.\n\n### User:\nHi there\n\n### Hello:\n"


def test_its_observer_logs_each_finished_request_as_one_json_line(hello_server):
    reply = httpx.post(hello_server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": CHAT, "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    deadline = time.monotonic() + 10  # the observer runs once the request has left the bus
    while not hello_server.request_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = hello_server.request_log.read_text().splitlines()
    record = json.loads(line)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["prompt_tokens"], 3)
    assert record["finish_reason"] == "length" and record["request_id"] and record["latency_s"] > 0


def test_its_own_tests_pass_with_lmserves_fixtures(example_env):
    """The example's tests, run the way its README says, by its own pytest configuration."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=EXAMPLE,
                            capture_output=True, text=True, env={**os.environ, **example_env})
    assert result.returncode == 0, result.stdout + result.stderr
