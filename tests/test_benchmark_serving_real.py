"""loadtests/benchmark_serving.py --serve-hf: HF transformers on the real model as a server the benchmark measures."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmserve.plugins.pytest_plugin import free_port

pytestmark = pytest.mark.real_model

SCRIPT = Path(__file__).resolve().parent.parent / "loadtests" / "benchmark_serving.py"


def test_hf_behind_the_minimal_server_runs_every_request_to_its_max_tokens(smollm2_gguf, tmp_path):
    port = free_port()
    with open(tmp_path / "hf.log", "w") as log:
        hf = subprocess.Popen([sys.executable, str(SCRIPT), "--serve-hf", str(smollm2_gguf), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert hf.poll() is None, (tmp_path / "hf.log").read_text()
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        out = tmp_path / "hf.json"
        result = subprocess.run([sys.executable, str(SCRIPT), "--url", f"hf={url}", "--concurrency", "1", "2",
                                 "--max-tokens", "8", "--json", str(out)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        figures = json.loads(out.read_text())
        assert figures["label"] == "hf"
        for level in figures["levels"]:
            assert level["tokens"] == level["requested_tokens"] > 0
            assert level["prompt_tokens"] > 20
    finally:
        hf.terminate()
        hf.wait(timeout=30)
