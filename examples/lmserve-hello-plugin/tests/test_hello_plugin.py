"""The hello plugin against a real lmserve server on a tiny model.

The fixtures named ``lmserve_*`` come with lmserve (its pytest plugin): no
conftest is needed. The plugin must be installed (``pip install -e .``): the
servers are separate processes, and they find it through its entry point.
"""

import json
import subprocess
import sys
import time

import pytest

from lmserve_hello_plugin import HelloChatTemplate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_the_template_puts_a_header_above_each_message():
    assert HelloChatTemplate().render(CHAT) == (
        "### System:\nBe brief.\n\n### User:\nHi there\n\n### Hello:\n")
    assert HelloChatTemplate().render(CHAT, add_generation_prompt=False).endswith("Hi there\n\n")
    assert not HelloChatTemplate().matches("tiny")


def test_lmserve_lists_the_plugin():
    listing = subprocess.run([sys.executable, "-m", "lmserve.frontends.cli", "plugins", "--json"],
                             capture_output=True, text=True, check=True)
    hello = [plugin for plugin in json.loads(listing.stdout) if plugin["name"] == "hello"]
    assert hello and "lmserve_request_finished" in hello[0]["hooks"]


def test_the_route_names_the_served_model(lmserve_client):
    reply = lmserve_client.get("/hello")
    assert reply.status_code == 200
    assert reply.json() == {"hello": "world", "model": "tiny"}


@pytest.fixture(scope="module")
def logging_server(lmserve_server_factory, tmp_path_factory):
    """A server that logs finished requests to a file of its own."""
    log = tmp_path_factory.mktemp("hello") / "requests.jsonl"
    server = lmserve_server_factory("--model-name", "tiny", "--hello-log", str(log))
    server.request_log = log
    return server


def test_the_server_renders_chats_with_the_hello_template(lmserve_server_factory):
    server = lmserve_server_factory("--model-name", "tiny", "--chat-template", "hello")
    with server.client() as client:
        tokens = client.post("/tokenize", json={"model": "tiny", "messages": CHAT}).json()["tokens"]
        prompt = client.post("/detokenize", json={"model": "tiny", "tokens": tokens}).json()["prompt"]
    server.stop()
    assert prompt == HelloChatTemplate().render(CHAT)


def test_each_finished_request_is_one_json_line(logging_server):
    with logging_server.client() as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": CHAT, "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    deadline = time.monotonic() + 10  # the observer runs once the request has left the bus
    while not logging_server.request_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = logging_server.request_log.read_text().splitlines()
    record = json.loads(line)
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"] == 3
    assert record["finish_reason"] == "length"
    assert record["request_id"] and record["latency_s"] > 0
