"""The self-attention block every family builds on: q/k/v projections, optional per-head
q/k norms, rotary embeddings, the cache's attention, the output projection.

What differs between families beyond these options (the window, the scale and the
soft-cap of the scores) is the cache's business: it holds how each layer attends
(:class:`~lmserve.backends.torch.attention.LayerAttention`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmserve.backends.torch.attention_cache import AttentionCache, MetadataT
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.models.linear import column_parallel_linear, fuse_linear, row_parallel_linear
from lmserve.backends.torch.models.rotary import apply_rotary
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel

#: ``(head_dim, eps) -> module`` normalising each head of q and k (Qwen3, Gemma 3).
HeadNorm = Callable[[int, float], nn.Module]


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads (all of them on one device).

    ``qk_norm``: a norm applied to every query and key head before the rotary
    embedding (Qwen3, Gemma 3); None: none (Llama). Biases as ``config`` says.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel = SINGLE,
                 qk_norm: HeadNorm | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.parallel = parallel
        self.head_dim = head_dim = config.head_dim
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        first_head, self.num_heads = parallel.heads(config.num_attention_heads)
        first_kv_head, self.num_kv_heads = parallel.kv_heads(config.num_key_value_heads)
        heads = (first_head * head_dim, self.num_heads * head_dim)
        kv_heads = (first_kv_head * head_dim, self.num_kv_heads * head_dim)
        self.q_proj = column_parallel_linear(hidden, heads, bias=qkv_bias)
        self.k_proj = column_parallel_linear(hidden, kv_heads, bias=qkv_bias)
        self.v_proj = column_parallel_linear(hidden, kv_heads, bias=qkv_bias)
        self.o_proj = row_parallel_linear(heads, hidden, bias=config.attention_output_bias, rank=parallel.rank)
        self.q_norm = qk_norm(head_dim, config.rms_norm_eps) if qk_norm is not None else None
        self.k_norm = qk_norm(head_dim, config.rms_norm_eps) if qk_norm is not None else None
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (one larger matmul instead of three)."""
        self.qkv_proj = fuse_linear(self.q_proj, self.k_proj, self.v_proj)
        self.split_sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(num_tokens, -1, self.head_dim)
        k = k.reshape(num_tokens, -1, self.head_dim)
        v = v.reshape(num_tokens, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.parallel.all_reduce(self.o_proj(kv_cache.attend(self.layer_idx, metadata, q, k, v)))
