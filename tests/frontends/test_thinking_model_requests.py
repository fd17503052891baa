"""A tiny Qwen3 shipped as a thinking model is: a chat template that reads
``enable_thinking`` and a ``generation_config.json`` with its sampling defaults.

- ``chat_template_kwargs`` (vLLM's, the openai SDK's ``extra_body``) and LMDeploy's
  top-level ``enable_thinking`` reach the template: the prompt grows by Qwen3's empty
  think block when thinking is off (``usage.prompt_tokens``, interactive's ``input_tokens``).
- ``--generation-config auto`` (the default): a request that leaves temperature, top_p,
  top_k or max_tokens unset samples with the model's values; an explicit value wins.
  ``none`` restores this server's own; a folder's file replaces the model's; a folder
  without one stops the server before it loads anything.

Seeded outputs are compared over several seeds: the same seed with the same sampling
values gives the same text, and the model's defaults (temperature 0.6, top_p 0.95,
top_k 20 of a vocabulary of hundreds) sample differently from 1.0/1.0/off.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest

from conftest import LMSERVE, LiveServer, free_port
from tests.family_checks import write_family_model

MODEL = "qwen3"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)
#: Qwen3's way of turning thinking off: the generation prompt closes an empty think block.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 6}
SEEDS = (1, 2, 3, 4)
OURS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen3-thinking")
    write_family_model(directory, "Qwen3Config", **TINY)
    generation = {"bos_token_id": 320, "eos_token_id": 322, "do_sample": True, **MODEL_DEFAULTS}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = THINKING_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("thinking-model-logs")


@pytest.fixture(scope="module")
def server(qwen3_dir, log_dir):
    server = LiveServer(qwen3_dir, "--model-name", MODEL, log_dir=log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def completion_texts(server: LiveServer, **sampling) -> list[str]:
    """The text of a 12-token completion per seed (ignore_eos: always 12 tokens)."""
    texts = []
    for seed in SEEDS:
        response = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "seed": seed,
            **sampling})
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    return texts


def card(server: LiveServer) -> dict:
    return httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]


# ------------------------------------------------------------ chat_template_kwargs


def chat_prompt_tokens(client: openai.OpenAI, **extra_body) -> int:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body=extra_body)
    return reply.usage.prompt_tokens


def test_chat_template_kwargs_turn_thinking_off_through_the_openai_sdk(client):
    thinking = chat_prompt_tokens(client)
    off = chat_prompt_tokens(client, chat_template_kwargs={"enable_thinking": False})
    assert off > thinking  # the empty think block is in the prompt
    assert chat_prompt_tokens(client, chat_template_kwargs={"enable_thinking": True}) == thinking
    assert chat_prompt_tokens(client, chat_template_kwargs={"a_variable_the_template_ignores": 1}) == thinking


def test_lmdeploys_top_level_enable_thinking_does_the_same_and_chat_template_kwargs_win(client):
    thinking = chat_prompt_tokens(client)
    off = chat_prompt_tokens(client, chat_template_kwargs={"enable_thinking": False})
    assert off > thinking
    assert chat_prompt_tokens(client, enable_thinking=False) == off
    assert chat_prompt_tokens(client, enable_thinking=False, chat_template_kwargs={"enable_thinking": True}) == thinking
    assert chat_prompt_tokens(client, enable_thinking=True, chat_template_kwargs={"enable_thinking": False}) == off


@pytest.mark.parametrize("extra, param", [
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"enable_thinking": "maybe"}, "enable_thinking"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/interactive"])
def test_a_wrong_template_variable_is_a_400_naming_the_field(server, extra, param, path):
    body = ({"model": MODEL, "messages": MESSAGES, "max_tokens": 1} if path == "/v1/chat/completions"
            else {"prompt": "hi", "request_output_len": 1})
    response = httpx.post(server.base_url + path, json={**body, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def interactive_input_tokens(server: LiveServer, session_id: int, **body) -> int:
    response = httpx.post(server.base_url + "/v1/chat/interactive", timeout=60, json={
        "session_id": session_id, "interactive_mode": True, "request_output_len": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()["input_tokens"]


def test_interactive_turns_take_the_template_variables_on_first_and_later_turns(server):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    first_thinking = interactive_input_tokens(server, 3501, prompt="Tell me a story")
    first_off = interactive_input_tokens(server, 3502, prompt=MESSAGES, **off)
    assert first_off > first_thinking
    later_thinking = interactive_input_tokens(server, 3501, prompt="Go on")
    later_off = interactive_input_tokens(server, 3502, prompt="Go on", enable_thinking=False)
    assert later_off - later_thinking == first_off - first_thinking
    for session_id in (3501, 3502):
        httpx.post(server.base_url + "/v1/chat/interactive", timeout=30, json={
            "session_id": session_id, "prompt": "", "request_output_len": 0, "interactive_mode": False})


# ------------------------------------------------------------- sampling defaults


def test_the_server_says_and_shows_the_models_sampling_defaults(server):
    assert ("lmserve: sampling defaults from the model's generation_config.json: "
            "temperature=0.6, top_p=0.95, top_k=20, max_tokens=6\n") in server.log()
    assert card(server)["sampling_defaults"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 6}


def test_unset_sampling_fields_take_the_models_defaults(server):
    defaults = completion_texts(server)
    assert defaults == completion_texts(server, temperature=0.6, top_p=0.95, top_k=20)
    assert defaults != completion_texts(server, **OURS)


def test_an_explicit_value_wins_over_the_models_default(server):
    greedy = completion_texts(server, temperature=0)
    assert completion_texts(server, top_k=1) == greedy  # the model's top_k 20 would sample
    assert completion_texts(server, temperature=1.0) == completion_texts(server, temperature=1.0, top_p=0.95,
                                                                        top_k=20)


def test_max_new_tokens_is_the_default_max_tokens_of_chat_and_completions(server, client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 9
    completion = client.completions.create(model=MODEL, prompt="Once", extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 6


def test_chat_requests_take_the_defaults_too(server, client):
    def texts(top_k=None, **sampling):
        extra_body = {"ignore_eos": True, **({} if top_k is None else {"top_k": top_k})}
        return [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, seed=seed,
                                               extra_body=extra_body, **sampling).choices[0].message.content
                for seed in SEEDS]

    assert texts() == texts(temperature=0.6, top_p=0.95, top_k=20)
    assert texts() != texts(temperature=1.0, top_p=1.0, top_k=0)


def test_generation_config_none_restores_this_servers_own(qwen3_dir, log_dir):
    server = LiveServer(qwen3_dir, "--model-name", MODEL, "--generation-config", "none", log_dir=log_dir)
    try:
        assert completion_texts(server) == completion_texts(server, **OURS)
        assert card(server)["sampling_defaults"] == {}
        assert "lmserve: sampling defaults: none from --generation-config none" in server.log()
    finally:
        server.stop()


def test_generation_config_dir_replaces_the_models_file(qwen3_dir, log_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 0.6}))
    server = LiveServer(qwen3_dir, "--model-name", MODEL, "--generation-config", str(tmp_path), log_dir=log_dir)
    try:
        assert completion_texts(server) == completion_texts(server, temperature=0)  # top_k 1: greedy
        assert card(server)["sampling_defaults"] == {"temperature": 0.6, "top_k": 1}
        assert f"lmserve: sampling defaults from {tmp_path}/generation_config.json: temperature=0.6, top_k=1" in (
            server.log())
    finally:
        server.stop()


@pytest.mark.parametrize("folder, error", [
    ("missing", "is not a folder"),
    ("", "has no generation_config.json"),
])
def test_a_bad_generation_config_folder_stops_the_server_before_the_weights_load(qwen3_dir, tmp_path, folder, error):
    result = subprocess.run(
        [*LMSERVE, "serve", "api_server", str(qwen3_dir), "--server-port", str(free_port()),
         "--generation-config", str(tmp_path / folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"lmserve: error: --generation-config {tmp_path / folder}: {error}" in result.stderr
    assert "Loading weights" not in result.stderr
