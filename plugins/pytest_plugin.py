"""Pytest fixtures for testing lmserve plugins, loaded through the ``pytest11`` entry point.

Installing lmserve makes these fixtures available in every pytest run of the
environment, so a plugin's tests can run a real server on a real (tiny) model
without any set-up of their own:

- ``lmserve_tiny_model_dir`` (session): a tiny random Llama with a byte-level
  BPE tokenizer, in the Hugging Face layout, written on the fly.
- ``lmserve_engine`` (session): the torch engine on that model, in-process.
- ``lmserve_server_factory`` (session): starts ``lmserve serve api_server`` in
  subprocesses with extra arguments and environment; stops them at the end.
- ``lmserve_server`` (session): one such server on the tiny model, served as
  ``tiny``.
- ``lmserve_client`` (function): an ``httpx.Client`` bound to ``lmserve_server``.

Every name starts with ``lmserve_`` so it never shadows a project's own
fixtures, and the module defines fixtures only (no hooks), so loading it
changes nothing else in a test run. Heavy imports (torch) happen inside the
fixtures that need them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import httpx
import pytest

from lmserve.plugins.tiny_model import write_tiny_model

if TYPE_CHECKING:  # torch loads only when a test asks for the engine
    from lmserve.backends.torch.backend import TorchBackend
    from lmserve.core.tokenizer import Tokenizer
    from lmserve.core.types import FinishReason

#: The command line that runs lmserve with this interpreter (and its environment).
LMSERVE = [sys.executable, "-m", "lmserve.frontends.cli"]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exact_defaults(args: tuple[str, ...]) -> list[str]:
    """The flags a test server gets unless ``args`` set them: float32, no quantization, eager."""
    given = {arg.split("=", 1)[0] for arg in args}
    defaults = []
    if "--dtype" not in given:
        defaults += ["--dtype", "float32"]
    if "--quantization" not in given:
        defaults += ["--quantization", "none"]
    if not given & {"--enforce-eager", "--no-enforce-eager"}:
        defaults.append("--enforce-eager")
    return defaults


class LiveServer:
    """``lmserve serve api_server`` (or ``server``: another of its commands, e.g. ``ray``)
    in a subprocess, on a free port.

    Returns from the constructor once ``/health`` answers 200, so a test can
    send requests at once; raises with the server's output when it exits or
    stays unhealthy. Its output goes to a log file in ``log_dir`` (the temp
    folder by default; the fixtures pass one of pytest's), read with :meth:`log`.
    It runs in float32, with float weights and every step eager unless ``args`` name a
    ``--dtype``, a ``--quantization`` or ``--[no-]enforce-eager``: tests compare outputs
    with float32 references (``auto`` picks bfloat16 on CPUs with AMX or AVX512-BF16, and
    int4 weights for a Q4 GGUF), and an eager server starts without compiling its decode step.
    """

    def __init__(self, model: str | Path, *args: str, env: dict | None = None, startup_timeout: float = 180,
                 log_dir: Path | None = None, server: str = "api_server"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"lmserve-test-{self.port}.log"
        self._log = open(self.log_path, "w+")
        self.process = subprocess.Popen(
            [*LMSERVE, "serve", server, str(model), "--server-name", "127.0.0.1",
             "--server-port", str(self.port), *_exact_defaults(args), *args],
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

    def client(self, **kwargs) -> httpx.Client:
        """An ``httpx.Client`` whose relative URLs go to this server (``timeout`` 60 s unless given)."""
        return httpx.Client(base_url=self.base_url, **{"timeout": 60.0, **kwargs})

    def log(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 20 s); safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass(frozen=True)
class Generation:
    """What :meth:`TinyEngine.generate` returns for one request."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason


class TinyEngine:
    """The torch backend on the tiny model, running in-process.

    ``backend`` is the started :class:`~lmserve.core.backend.Backend` (submit
    and abort requests on it directly to test backend-level behaviour), and
    ``tokenizer`` the model's tokenizer. :meth:`generate` runs one request to
    its end, for tests that only need tokens out.
    """

    def __init__(self, backend: TorchBackend, tokenizer: Tokenizer):
        self.backend = backend
        self.tokenizer = tokenizer
        self._outputs: dict[str, queue.SimpleQueue] = {}
        self._ids = itertools.count()
        backend.start(self._route_outputs)

    def _route_outputs(self, outputs) -> None:
        for output in outputs:
            waiting = self._outputs.get(output.request_id)
            if waiting is not None:  # None: a request given up on after a timeout
                waiting.put(output)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 8, timeout: float = 60,
                 **sampling) -> Generation:
        """Generate from ``prompt`` (text, encoded without BOS, or token ids);
        ``sampling`` goes to :class:`~lmserve.core.types.SamplingParams`
        (greedy unless ``temperature`` is given)."""
        from lmserve.core.types import EngineRequest, SamplingParams

        ids = self.tokenizer.encode(prompt, add_bos=False) if isinstance(prompt, str) else prompt
        request_id = f"lmserve-test-{next(self._ids)}"
        outputs = self._outputs[request_id] = queue.SimpleQueue()
        params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
        self.backend.submit(EngineRequest(request_id, tuple(ids), params))
        token_ids: list[int] = []
        try:
            while True:
                output = outputs.get(timeout=timeout)
                token_ids.extend(output.new_token_ids)
                if output.finish_reason is not None:
                    break
        except queue.Empty:
            self.backend.abort(request_id)  # frees its room in the engine for the next tests
            raise TimeoutError(f"the engine sent nothing for {request_id} in {timeout}s") from None
        finally:
            del self._outputs[request_id]
        if output.error is not None:
            raise RuntimeError(f"the engine failed the request: {output.error}")
        return Generation(tuple(token_ids), self.tokenizer.decode(token_ids), output.finish_reason)


@pytest.fixture(scope="session")
def lmserve_tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden size 64, 256 positions) with a
    byte-level BPE tokenizer and a ChatML template, in the HF layout; pass it
    as MODEL to ``lmserve serve api_server``."""
    return write_tiny_model(tmp_path_factory.mktemp("lmserve-tiny-model"))


@pytest.fixture(scope="session")
def lmserve_engine(lmserve_tiny_model_dir) -> Iterator[TinyEngine]:
    """The torch engine on the tiny model, on the CPU, started for the session
    and shut down after it."""
    from lmserve.backends.torch.factory import EngineConfig, create_backend
    from lmserve.plugins.tokenizer_files import tokenizer_from_path

    backend = create_backend(lmserve_tiny_model_dir, EngineConfig(
        device="cpu", dtype="float32", cache_max_entry_count=64, cache_block_seq_len=16, enforce_eager=True))
    engine = TinyEngine(backend, tokenizer_from_path(lmserve_tiny_model_dir))
    yield engine
    backend.shutdown()


@pytest.fixture(scope="session")
def lmserve_server_factory(lmserve_tiny_model_dir, tmp_path_factory) -> Iterator[Callable[..., LiveServer]]:
    """``start(*args, model=None, env=None)``: a :class:`LiveServer` of
    ``lmserve serve api_server`` on ``model`` (the tiny model by default) with
    the extra command-line ``args`` and environment variables ``env`` (added to
    this process's). Every server started is stopped at the end of the
    session; stop one sooner with ``server.stop()``."""
    servers: list[LiveServer] = []
    log_dir = tmp_path_factory.mktemp("lmserve-logs")

    def start(*args: str, model: str | Path | None = None, env: dict | None = None) -> LiveServer:
        server = LiveServer(model or lmserve_tiny_model_dir, *args, env=env, log_dir=log_dir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def lmserve_server(lmserve_server_factory) -> LiveServer:
    """A live server on the tiny model, served under the model name ``tiny``."""
    return lmserve_server_factory("--model-name", "tiny")


@pytest.fixture
def lmserve_client(lmserve_server) -> Iterator[httpx.Client]:
    """An ``httpx.Client`` bound to ``lmserve_server``: ``lmserve_client.get("/health")``."""
    with lmserve_server.client() as client:
        yield client
