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


# ------------------------------------------------------------------ its model family

HELLO_LAYERS, HELLO_HEADS, HELLO_KV_HEADS, HELLO_HIDDEN, HELLO_INNER = 2, 4, 2, 64, 128


def write_hello_checkpoint(directory) -> dict:
    """A tiny random "HelloForCausalLM" checkpoint (the example's family) with lmserve's tiny
    tokenizer; returns its weights."""
    from safetensors.torch import save_file

    from lmserve.plugins.tiny_model import random_weights, write_tiny_tokenizer

    vocab = write_tiny_tokenizer(directory)
    head_dim = HELLO_HIDDEN // HELLO_HEADS
    shapes = [("model.embed_tokens.weight", (vocab, HELLO_HIDDEN))]
    for layer in range(HELLO_LAYERS):
        prefix = f"model.layers.{layer}."
        shapes += [(prefix + "input_layernorm.weight", (HELLO_HIDDEN,)),
                   (prefix + "self_attn.q_proj.weight", (HELLO_HIDDEN, HELLO_HIDDEN)),
                   (prefix + "self_attn.k_proj.weight", (HELLO_KV_HEADS * head_dim, HELLO_HIDDEN)),
                   (prefix + "self_attn.v_proj.weight", (HELLO_KV_HEADS * head_dim, HELLO_HIDDEN)),
                   (prefix + "self_attn.o_proj.weight", (HELLO_HIDDEN, HELLO_HIDDEN)),
                   (prefix + "mlp.gate_proj.weight", (HELLO_INNER, HELLO_HIDDEN)),
                   (prefix + "mlp.up_proj.weight", (HELLO_INNER, HELLO_HIDDEN)),
                   (prefix + "mlp.down_proj.weight", (HELLO_HIDDEN, HELLO_INNER))]
    shapes += [("model.norm.weight", (HELLO_HIDDEN,)), ("lm_head.weight", (vocab, HELLO_HIDDEN))]
    weights = random_weights(shapes, seed=3)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["HelloForCausalLM"], "model_type": "hello", "vocab_size": vocab,
        "hidden_size": HELLO_HIDDEN, "intermediate_size": HELLO_INNER, "num_hidden_layers": HELLO_LAYERS,
        "num_attention_heads": HELLO_HEADS, "num_key_value_heads": HELLO_KV_HEADS, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "bos_token_id": 320, "eos_token_id": 322}))
    return weights


def hello_reference_greedy(weights: dict, ids: list[int], new_tokens: int) -> list[int]:
    """The parallel-layer model written out plainly (full recompute each step): the reference."""
    import torch

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    head_dim = HELLO_HIDDEN // HELLO_HEADS
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def rotate(x, positions):  # x [T, heads, head_dim], HF's rotate_half layout
        angles = positions[:, None].float() * inv_freq[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    tokens = list(ids)
    for _ in range(new_tokens):
        positions = torch.arange(len(tokens))
        x = weights["model.embed_tokens.weight"][torch.tensor(tokens)]
        for layer in range(HELLO_LAYERS):
            w = {k.split(f"model.layers.{layer}.", 1)[1]: v for k, v in weights.items()
                 if k.startswith(f"model.layers.{layer}.")}
            h = rms(x, w["input_layernorm.weight"])
            q = rotate((h @ w["self_attn.q_proj.weight"].T).view(len(tokens), HELLO_HEADS, head_dim), positions)
            k = rotate((h @ w["self_attn.k_proj.weight"].T).view(len(tokens), HELLO_KV_HEADS, head_dim), positions)
            v = (h @ w["self_attn.v_proj.weight"].T).view(len(tokens), HELLO_KV_HEADS, head_dim)
            k = k.repeat_interleave(HELLO_HEADS // HELLO_KV_HEADS, dim=1)
            v = v.repeat_interleave(HELLO_HEADS // HELLO_KV_HEADS, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim ** 0.5
            scores = scores.masked_fill(torch.ones(len(tokens), len(tokens)).triu(1).bool(), float("-inf"))
            attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(tokens), -1)
            mlp = (torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T))
            x = x + attended @ w["self_attn.o_proj.weight"].T + mlp @ w["mlp.down_proj.weight"].T
        logits = rms(x[-1], weights["model.norm.weight"]) @ weights["lm_head.weight"].T
        tokens.append(int(logits.argmax()))
    return tokens[len(ids):]


def test_its_model_family_serves_a_checkpoint_lmserve_does_not_know(example_env, tmp_path_factory):
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("hello-model")
    weights = write_hello_checkpoint(directory)
    prompts = [[5, 17, 42, 99, 3], list(range(40, 75))]
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    expected = [tokenizer.decode(hello_reference_greedy(weights, ids, 12), skip_special_tokens=False)
                for ids in prompts]
    server = LiveServer(directory, "--model-name", "hello-lm", env=example_env)
    try:
        texts = [httpx.post(server.base_url + "/v1/completions", timeout=60, json={
            "model": "hello-lm", "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False}).json()["choices"][0]["text"] for ids in prompts]
    finally:
        server.stop()
    assert texts == expected


def test_without_the_plugin_the_family_is_unknown(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hello-model-alone")
    write_hello_checkpoint(directory)
    result = subprocess.run([*LMSERVE, "serve", "api_server", str(directory), "--server-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unsupported architecture HelloForCausalLM; supported:" in result.stderr
    assert "LlamaForCausalLM" in result.stderr.split("supported:", 1)[1]
