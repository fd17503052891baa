"""The pre-norm decoder layer most families share: RMSNorm, attention, residual add;
RMSNorm, MLP, residual add (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Phi-3, InternLM2).

What differs between them is passed in: per-head q/k norms (Qwen3) and the MLP (a gated
MLP, or a sparse mixture of experts). Gemma's sandwich norms wire their own layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.backends.torch.attention_cache import AttentionCache, MetadataT
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.models.attention_layer import Attention, HeadNorm
from lmserve.backends.torch.models.mlp import GatedMLP
from lmserve.backends.torch.models.norms import RMSNorm
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream. ``qk_norm``: per-head
    q/k norms (None: none); ``mlp``: the layer's MLP (None: a SwiGLU of ``intermediate_size``)."""

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel = SINGLE,
                 qk_norm: HeadNorm | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, parallel, qk_norm)
        self.mlp = mlp if mlp is not None else GatedMLP(config.hidden_size, config.intermediate_size, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, metadata)
        return x + self.mlp(self.post_attention_layernorm(x))
