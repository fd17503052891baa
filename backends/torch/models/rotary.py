"""Rotary position embeddings in HF's "rotate_half" layout, with HF's ``rope_type`` variants.

One :class:`RotaryEmbedding` turns a step's positions into cos/sin tables once per
forward pass; every layer that uses it applies them with :func:`apply_rotary`. A
family whose layers rotate differently (Gemma 3's local and global bases) holds
one per kind.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmserve.backends.torch.model_config import ModelConfig


def compute_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies (float32, ``[head_dim // 2]``) for positions up
    to ``max_position_embeddings``, following HF's ``rope_type`` definitions."""
    dim = config.head_dim
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
    """cos/sin tables for a batch of positions, shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", compute_inv_freq(config), persistent=False)

    def reset_parameters(self, freq_factors: torch.Tensor | None = None) -> None:
        """Recompute ``inv_freq`` in float32 on its current device (after the
        model was built on the meta device); ``freq_factors`` divide it, as
        llama.cpp's ``rope_freqs`` tensor does for Llama 3 GGUFs."""
        inv_freq = compute_inv_freq(self.config, self.inv_freq.device)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(inv_freq)
        self.inv_freq = inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.float()
        scaling = self.config.rope_scaling
        if scaling is not None and scaling["rope_type"] == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions, inv_freq, scaling["factor"])
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _dynamic_inv_freq(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                          factor: float) -> torch.Tensor:
        """Dynamic NTK: past ``max_position_embeddings`` the base grows with the
        sequence length (here: the last new position + 1), computed on the
        device without a host sync."""
        dim, max_len = self.config.head_dim, self.config.max_position_embeddings
        seq_len = positions.max().float() + 1
        base = self.config.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
        return torch.where(seq_len > max_len, 1.0 / (base ** exponents), inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[T, heads, head_dim]``; ``cos``/``sin``: ``[T, head_dim]``."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
