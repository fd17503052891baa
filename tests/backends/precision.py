"""Teacher-forced next-token figures of a model over a fixed token sequence:
how often two models' top-1 tokens agree, and each one's perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmserve.backends.torch.factory import EngineConfig, load_engine_model
from lmserve.backends.torch.quantized_linear import DENSE_ABOVE_ROWS
from tests.reference_kv_cache import KVCache

TEXT = (Path(__file__).parent.parent / "data" / "precision_text.txt").read_text()


def engine_logits(path, ids: list[int], **config) -> torch.Tensor:
    """float32 ``[len(ids), vocab]`` logits of the model as the engine loads it
    (``config``: :class:`EngineConfig` fields such as dtype and quantization; float
    weights unless given), run over ``ids`` a few rows at a time, as decodes run:
    quantized layers take their weight-only kernels only up to DENSE_ABOVE_ROWS rows."""
    loaded = load_engine_model(path, EngineConfig(device="cpu", **{"quantization": "none", **config}))
    cache = KVCache.allocate(loaded.config, len(ids), loaded.dtype, "cpu")
    logits = []
    with torch.inference_mode():
        for start in range(0, len(ids), DENSE_ABOVE_ROWS):
            chunk = torch.tensor(ids[start : start + DENSE_ABOVE_ROWS])
            hidden = loaded.model(chunk, torch.arange(start, start + len(chunk)), cache)
            logits.append(loaded.model.compute_logits(hidden).float())
    return torch.cat(logits)


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The fraction of positions where both pick the same next token."""
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids[1:]`` given each prefix."""
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    targets = torch.tensor(ids[1:])
    return math.exp(-logprobs.gather(1, targets[:, None]).mean().item())
