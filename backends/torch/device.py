"""Resolve ``--device`` and ``--dtype`` ("auto" included) into torch objects."""

from __future__ import annotations

from typing import NamedTuple

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DtypeChoice(NamedTuple):
    dtype: torch.dtype
    #: Why, for the start-up line ("--dtype bfloat16", or what ``auto`` found).
    reason: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine.")
    return device


def cpu_bf16_units() -> list[str]:
    """The CPU's native bfloat16 matmul units torch can use: AMX tiles, AVX512-BF16."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def choose_dtype(name: str, device: torch.device) -> DtypeChoice:
    """``auto``: bfloat16 (or float16 where bf16 is missing) on CUDA; on the CPU
    bfloat16 where it has native bf16 matmul units, float32 elsewhere (without
    them bf16 is converted in software: it still reads half the bytes, so one
    stream decodes faster, but prefill and large batches run slower than float32)."""
    if name != "auto":
        return DtypeChoice(_DTYPES[name], f"--dtype {name}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto: CUDA with bfloat16")
        return DtypeChoice(torch.float16, "auto: CUDA without bfloat16")
    units = cpu_bf16_units()
    if units:
        return DtypeChoice(torch.bfloat16, f"auto: this CPU has native bfloat16 matmul ({', '.join(units)})")
    return DtypeChoice(torch.float32, "auto: this CPU has no native bfloat16 matmul (AMX or AVX512-BF16)")
