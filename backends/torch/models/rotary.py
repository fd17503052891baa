"""Rotary position embeddings in HF's "rotate_half" layout, with HF's ``rope_type`` variants.

One :class:`RotaryEmbedding` turns a step's positions into cos/sin tables once per
forward pass; every layer that uses it applies them with :func:`apply_rotary`. A
family whose layers rotate differently (Gemma 3's local and global bases) holds
one per kind.

Beyond the config's ``rope_scaling``, a family may rotate only the first ``rotary_dim``
dimensions of each head (partial rotary: Phi-4-mini, where the rest pass through
unchanged), divide the frequencies by per-frequency factors (llama.cpp's ``rope_freqs``,
LongRoPE's short or long factors) and scale the cos/sin tables (LongRoPE's attention
factor): see :class:`RotaryEmbedding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmserve.backends.torch.model_config import ModelConfig


@dataclass(frozen=True)
class LongRoPE:
    """LongRoPE ("su") scaling, Phi-3's: the inverse frequencies are divided by one set of
    per-frequency factors for sequences within the pretraining length
    (``original_max_position_embeddings``), by another beyond it, and the cos/sin tables
    are multiplied by ``attention_factor``. The factors are None where they come with
    the weights (a GGUF file's ``rope_factors_short``/``rope_factors_long`` tensors)."""

    original_max_position_embeddings: int
    attention_factor: float
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @staticmethod
    def default_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
        """The paper's ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` (1 when not
        extended), ``factor`` being how many times longer the model's context is."""
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))

    def uses_long_factors(self, max_sequence_length: int) -> bool:
        """Whether a model serving sequences of up to ``max_sequence_length`` tokens rotates
        every position with the long factors (llama.cpp's and vLLM's choice by the context
        the model is run with, so a sequence's keys never change as it grows)."""
        return max_sequence_length > self.original_max_position_embeddings


def compute_inv_freq(config: ModelConfig, device: torch.device | str | None = None,
                     rotary_dim: int | None = None) -> torch.Tensor:
    """RoPE inverse frequencies (float32, ``[rotary_dim // 2]``; ``rotary_dim`` defaults to
    ``head_dim``) for positions up to ``max_position_embeddings``, following HF's
    ``rope_type`` definitions."""
    dim = rotary_dim or config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context_len / low, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context_len / high) & (wavelen <= old_context_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables (``[T, rotary_dim]``) for a batch of positions, shared by all layers.

    ``rotary_dim``: how many leading dimensions of each head rotate (default: all of
    ``head_dim``). ``freq_factors`` (``rotary_dim // 2`` numbers) divide the inverse
    frequencies, as llama.cpp's ``rope_freqs`` and LongRoPE's factors do;
    ``attention_factor`` multiplies the cos/sin tables (LongRoPE's, YaRN's ``mscale``).
    """

    def __init__(self, config: ModelConfig, rotary_dim: int | None = None,
                 freq_factors: tuple[float, ...] | None = None, attention_factor: float = 1.0):
        super().__init__()
        self.config = config
        self.rotary_dim = rotary_dim or config.head_dim
        if not (0 < self.rotary_dim <= config.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={config.head_dim}], got {self.rotary_dim}")
        self.freq_factors = self._checked_factors(freq_factors)
        self.attention_factor = float(attention_factor)
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def reset_parameters(self, freq_factors: torch.Tensor | None = None) -> None:
        """Recompute ``inv_freq`` in float32 on its current device (after the
        model was built on the meta device); ``freq_factors`` (e.g. a GGUF file's
        ``rope_freqs`` tensor for Llama 3, its LongRoPE factors for Phi-3) replace
        those given at construction and divide it from now on."""
        if freq_factors is not None:
            self.freq_factors = self._checked_factors(tuple(float(f) for f in freq_factors.flatten()))
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def _checked_factors(self, factors: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if factors is not None and len(factors) != self.rotary_dim // 2:
            raise ValueError(f"{len(factors)} rotary frequency factors for {self.rotary_dim // 2} frequencies")
        return tuple(factors) if factors is not None else None

    def _inv_freq(self, device: torch.device | str | None) -> torch.Tensor:
        inv_freq = compute_inv_freq(self.config, device, self.rotary_dim)
        if self.freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(self.freq_factors, dtype=torch.float32, device=device)
        return inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.float()
        scaling = self.config.rope_scaling
        if scaling is not None and scaling["rope_type"] == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions, inv_freq, scaling["factor"])
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _dynamic_inv_freq(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                          factor: float) -> torch.Tensor:
        """Dynamic NTK: past ``max_position_embeddings`` the base grows with the
        sequence length (here: the last new position + 1), computed on the
        device without a host sync."""
        dim, max_len = self.rotary_dim, self.config.max_position_embeddings
        seq_len = positions.max().float() + 1
        base = self.config.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
        return torch.where(seq_len > max_len, 1.0 / (base ** exponents), inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[T, heads, head_dim]``; ``cos``/``sin``: ``[T, rotary_dim]``. With a
    ``rotary_dim`` below ``head_dim`` (partial rotary) only the leading ``rotary_dim``
    dimensions of each head rotate; the others pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos[:, None, :] + rotate_half(rotated) * sin[:, None, :], passed), dim=-1)
