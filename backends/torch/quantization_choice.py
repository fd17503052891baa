"""Resolve ``--quantization`` (``auto`` included) into a weight-only method, or none.

``auto`` serves a quantized GGUF file at its own precision on the CPU, as llama.cpp
serves it, instead of widening its weights to ``--dtype``: projections stored in
4 bits become int4 layers, 5 to 8 bits int8 (int8 also when the file mixes 4-bit
and wider types, as Q4_K_M files do: no projection loses bits; a file with float
projections among quantized ones is served at ``--dtype``). A Q4_1 file's
codes come back exactly; other 4-bit types are re-derived from their values
(:func:`~lmserve.backends.torch.quantized_linear.quantize_int4`), close but not
bit for bit. Float files, and CUDA (no weight-only kernels there yet), get none.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmserve.backends.torch.engine_config import check_quantization
from lmserve.backends.torch.weights import gguf_tensor_types
from lmserve.core.config import QUANTIZATION_CHOICES

#: GGUF weight types by how many bits a weight keeps.
FOUR_BIT_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
UP_TO_EIGHT_BIT_TYPES = FOUR_BIT_TYPES | {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"}

_PROJECTION = re.compile(r"\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))\.weight$")


def choose_quantization(name: str, path: str | Path, device: torch.device) -> tuple[str | None, str]:
    """``(method or None, why)`` for ``--quantization name`` on the model at ``path``."""
    check_quantization(name, QUANTIZATION_CHOICES)
    if name != "auto":
        return (None if name == "none" else name), f"--quantization {name}"
    if device.type != "cpu":
        return None, "auto: the weight-only kernels run on the CPU only"
    kinds = {kind for tensor, kind in gguf_tensor_types(path).items() if _PROJECTION.search(tensor)}
    found = ", ".join(sorted(kinds))
    if not kinds or kinds <= {"F32", "F16", "BF16"}:
        return None, "auto: the weights are not quantized"
    if kinds <= FOUR_BIT_TYPES:
        return "int4", f"auto: the file's projections are {found}"
    if kinds <= UP_TO_EIGHT_BIT_TYPES:
        return "int8", f"auto: the file's projections are {found}"
    return None, f"auto: the file's projections are {found}, served dequantized"
