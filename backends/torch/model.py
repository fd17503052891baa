"""One llama-family decoder for every architecture the torch engine runs.

RMSNorm, rotary position embeddings in HF's "rotate_half" layout, grouped-query
attention, a SwiGLU MLP, optional q/k/v (and o) biases and optionally tied
embeddings cover Llama 2/3, Mistral, Qwen2, InternLM2 and SmolLM. Parameter
names follow HF transformers' ``LlamaForCausalLM`` so HF checkpoints load by
name. The code is device-agnostic: the same module runs on the CPU and CUDA.

Tokens are a flat ``[T]`` batch with their positions; everything attention
needs beyond that comes from the KV cache (an :class:`AttentionCache`) and the
metadata it reads, which the model passes through unread.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.backends.torch.attention_cache import AttentionCache, MetadataT
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel, WeightSlice


def make_linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Linear:
    """Every projection of the model is built here or by the two functions below: a plain
    ``nn.Linear``, whole on one device."""
    return nn.Linear(in_features, out_features, bias=bias)


def column_parallel_linear(in_features: int, rows: tuple[int, int], *, bias: bool = False) -> nn.Linear:
    """The ``(start, length)`` output rows of a projection (this rank's heads or MLP part).

    Under tensor parallelism a layer holds only its part of the weight; ``shard`` tells
    the weight loader which part of each full tensor that is."""
    start, length = rows
    linear = make_linear(in_features, length, bias=bias)
    linear.shard = {"weight": WeightSlice(0, start, length), "bias": WeightSlice(0, start, length)}
    return linear


def row_parallel_linear(columns: tuple[int, int], out_features: int, *, bias: bool, rank: int) -> nn.Linear:
    """The ``(start, length)`` input columns of a projection whose output the ranks add up
    (one all-reduce, by the caller); the bias is added once, by rank 0."""
    start, length = columns
    linear = make_linear(length, out_features, bias=bias)
    linear.shard = {"weight": WeightSlice(1, start, length), "bias": WeightSlice(0, 0, 0 if rank else out_features)}
    return linear


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's slice of the vocabulary (padded so that every
    rank's slice has the same length); other tokens look up zeros, and the ranks' rows
    are added up."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: TensorParallel):
        self.start, length = parallel.padded_split(vocab_size)
        super().__init__(length, hidden_size)
        self.parallel = parallel
        self.shard = {"weight": WeightSlice(0, self.start, length)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(torch.where(inside, local, 0), self.weight) * inside[:, None].to(self.weight.dtype)
        return self.parallel.all_reduce(rows)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads (all of them on one device)."""

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel = SINGLE):
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
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (one larger matmul instead of three)."""
        self.qkv_proj = _fuse(self.q_proj, self.k_proj, self.v_proj)
        self.split_sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(num_tokens, -1, self.head_dim)
        k = k.reshape(num_tokens, -1, self.head_dim)
        v = v.reshape(num_tokens, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.parallel.all_reduce(self.o_proj(kv_cache.attend(self.layer_idx, metadata, q, k, v)))


class MLP(nn.Module):
    """SwiGLU over this rank's part of the inner dimension (all of it on one device)."""

    def __init__(self, config: ModelConfig, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.parallel = parallel
        hidden, inner = config.hidden_size, parallel.split(config.intermediate_size)
        self.gate_proj = column_parallel_linear(hidden, inner)
        self.up_proj = column_parallel_linear(hidden, inner)
        self.down_proj = row_parallel_linear(inner, hidden, bias=False, rank=parallel.rank)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj``."""
        self.gate_up_proj = _fuse(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.parallel.all_reduce(self.down_proj(F.silu(gate) * up))


def _fuse(*layers: nn.Linear) -> nn.Linear:
    """One column-parallel layer whose output is the layers' outputs side by side.

    (Under tensor parallelism each part is sharded on its own, then fused per rank.)
    """
    first = layers[0]
    fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers),
                      bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, parallel)
        self.mlp = MLP(config, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
                             if parallel.is_parallel else nn.Embedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i, parallel) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its output projection (``lm_head``).

    Built by the weight loader (on the meta device, then filled); a test may
    build one directly with random weights. Under tensor parallelism (``parallel``)
    it holds one rank's part of every projection (:mod:`~lmserve.backends.torch.tensor_parallel`).
    """

    def __init__(self, config: ModelConfig, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.model = LlamaModel(config, parallel)
        self.lm_head = column_parallel_linear(config.hidden_size, parallel.padded_split(config.vocab_size))
        self.tie_weights()

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into single matmuls (the engine does this after loading)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def tie_weights(self) -> None:
        """Share the embedding matrix with ``lm_head`` when the config says so
        (again after moving the model, which can untie them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT | None = None) -> torch.Tensor:
        """Run ``input_ids`` (``[T]``) at ``positions`` (``[T]``), storing their
        keys/values in ``kv_cache``; earlier positions must be cached already.
        Returns the final-norm hidden states ``[T, hidden]``.

        ``metadata`` describes the batch for the cache's ``attend`` (the paged
        engine builds it per step); None asks a one-sequence cache
        (:class:`~lmserve.backends.torch.kv_cache.KVCache`) to derive it from
        ``positions``."""
        if metadata is None:
            metadata = kv_cache.attention_metadata(positions)
        return self.hidden_states(input_ids, positions, kv_cache, metadata)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        """:meth:`forward` without its inference-mode wrapper, for ``torch.compile``
        (which traces it from inside the caller's inference mode)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_cache, metadata)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` logits in the model's dtype; pass
        only the rows whose next token is wanted (e.g. the last one). Under tensor
        parallelism every rank computes its slice of the vocabulary and gets all of them."""
        logits = self.lm_head(hidden)
        if self.parallel.is_parallel:
            logits = self.parallel.gather_columns(logits)[:, : self.config.vocab_size]
        return logits

    def weight_slices(self) -> dict[str, WeightSlice]:
        """By parameter name, the part of the full tensor each parameter holds (only
        the parameters of a model split by tensor parallelism)."""
        if not self.parallel.is_parallel:
            return {}
        return {f"{module_name}.{name}": part for module_name, module in self.named_modules()
                for name, part in getattr(module, "shard", {}).items()}
