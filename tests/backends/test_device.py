"""--dtype auto: what it picks on the CPU and why (the reason goes on the start-up line)."""

from __future__ import annotations

import pytest
import torch

from lmserve.backends.torch import device
from lmserve.backends.torch.factory import EngineConfig, create_backend


def test_auto_picks_bfloat16_where_the_cpu_has_native_bf16_matmul(monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: ["AMX", "AVX512-BF16"])
    choice = device.choose_dtype("auto", torch.device("cpu"))
    assert choice.dtype == torch.bfloat16
    assert choice.reason == "auto: this CPU has native bfloat16 matmul (AMX, AVX512-BF16)"


def test_auto_picks_float32_elsewhere(monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: [])
    choice = device.choose_dtype("auto", torch.device("cpu"))
    assert choice.dtype == torch.float32
    assert "no native bfloat16 matmul" in choice.reason


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(monkeypatch, name, dtype):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: ["AMX"])
    assert device.choose_dtype(name, torch.device("cpu")) == (dtype, f"--dtype {name}")


def test_the_cpu_probe_names_only_units_torch_reports():
    assert set(device.cpu_bf16_units()) <= {"AMX", "AVX512-BF16"}


def test_the_start_up_line_says_what_the_weights_are_and_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: [])
    backend = create_backend(tiny_model_dir, EngineConfig(device="cpu", cache_max_entry_count=8,
                                                          cache_block_seq_len=16))
    try:
        line = backend.describe()
    finally:
        backend.shutdown()
    assert line.startswith("torch engine on cpu, float32 (auto: this CPU has no native bfloat16 matmul "
                           "(AMX or AVX512-BF16)): KV cache 8 blocks x 16 tokens")
