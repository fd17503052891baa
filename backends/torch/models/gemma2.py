"""The Gemma 2 family, and what Gemma 3 (:mod:`.gemma3`) builds on.

What sets Gemma apart from Llama: embeddings scaled by ``sqrt(hidden_size)``, norms that
multiply by ``1 + weight`` (:class:`~.norms.OffsetRMSNorm`) around both the attention and
the MLP (four per layer), a GeGLU MLP, scores scaled by ``query_pre_attn_scalar ** -0.5``
rather than ``head_dim ** -0.5``, sliding-window layers interleaved with global ones, tied
embeddings, and in Gemma 2 attention scores and final logits soft-capped
(``cap * tanh(x / cap)``). The window, scale and soft-cap are the KV cache's business
(:func:`~lmserve.backends.torch.attention.layer_attention` reads them off the config); the
layers here only say which rotary table each layer takes.

HF's sliding window counts the current position: a window of W attends to the W latest
positions (``kv > q - W`` in transformers' masks, ``q - kv >= W`` masked in llama.cpp), as
:class:`~lmserve.backends.torch.attention.LayerAttention`'s does, so it is taken as it is.

GGUF files from llama.cpp's converter store every norm weight plus one (llama.cpp multiplies
by the stored weight); the offset is taken off again as they load. llama.cpp's GGUF carries
no ``query_pre_attn_scalar``: it scales by ``head_dim ** -0.5`` except for the 27B models
(by ``(hidden_size / heads) ** -0.5``, told apart by their layer count), and so does this
reader. Nor does it carry which layers slide: llama.cpp assumes Gemma's own pattern (every
second layer global in Gemma 2) unless ``attention.sliding_window_pattern`` says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.attention_cache import AttentionCache, MetadataT
from lmserve.backends.torch.model_config import (
    GGUFFieldReader,
    HFConfigReader,
    ModelConfig,
    common_gguf_fields,
    common_hf_fields,
)
from lmserve.backends.torch.models.attention_layer import Attention, HeadNorm
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.family import ModelFamily, Tensors
from lmserve.backends.torch.models.mlp import ACTIVATIONS, GatedMLP
from lmserve.backends.torch.models.norms import OffsetRMSNorm
from lmserve.backends.torch.models.rotary import RotaryEmbedding
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class GemmaConfig(ModelConfig):
    """:class:`ModelConfig` with what Gemma 2 and 3 add: the MLP's activation and the
    rotary embedding of the sliding-window layers where it differs from the global layers'
    (Gemma 3's ``rope_local_base_freq``)."""

    hidden_activation: str = "gelu_pytorch_tanh"
    #: The sliding layers' RoPE base; None: they rotate as the global layers do.
    local_rope_theta: float | None = None
    #: The sliding layers' rope scaling (as ``rope_scaling``), with ``local_rope_theta``.
    local_rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        self.local_rope_config()  # its checks, now rather than when the model is built

    def local_rope_config(self) -> ModelConfig | None:
        """The config the sliding layers' rotary embedding is built from (validated as any
        config is); None where they share the global layers'."""
        if self.local_rope_theta is None:
            return None
        return dataclasses.replace(self, rope_theta=self.local_rope_theta, rope_scaling=self.local_rope_scaling,
                                   local_rope_theta=None, local_rope_scaling=None)


class GemmaDecoderLayer(nn.Module):
    """Attention and a GeGLU MLP, each between two norms (before it, and on its output
    before the residual add); ``qk_norm``: Gemma 3's per-head q/k norms."""

    def __init__(self, config: GemmaConfig, layer_idx: int, parallel: TensorParallel = SINGLE,
                 qk_norm: HeadNorm | None = None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx, parallel, qk_norm=qk_norm)
        self.mlp = GatedMLP(hidden, config.intermediate_size, parallel, activation=config.hidden_activation)
        self.input_layernorm = OffsetRMSNorm(hidden, eps)
        self.post_attention_layernorm = OffsetRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(hidden, eps)
        #: Which of :meth:`GemmaForCausalLM.position_embeddings`' tables this layer rotates with.
        self.rope_index = int(config.layer_types is not None and config.layer_types[layer_idx] == SLIDING)

    def forward(self, x: torch.Tensor, rope: Sequence[tuple[torch.Tensor, torch.Tensor]],
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), rope[self.rope_index], kv_cache, metadata)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(CausalLM):
    """HF transformers' ``Gemma2ForCausalLM``; with :attr:`qk_norm`, ``Gemma3ForCausalLM``.

    Every layer gets two rotary tables, the global layers' and the sliding layers' (the
    same one unless the config gives the sliding layers their own base), and takes the
    one of its kind."""

    norm_class = OffsetRMSNorm
    #: Per-head q/k norms (Gemma 3); None: none (Gemma 2).
    qk_norm: HeadNorm | None = None

    def __init__(self, config: GemmaConfig, parallel: TensorParallel = SINGLE):
        super().__init__(config, parallel)
        local = config.local_rope_config()
        self.model.local_rotary_emb = RotaryEmbedding(local) if local is not None else None

    def make_layer(self, config: GemmaConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return GemmaDecoderLayer(config, layer_idx, parallel, qk_norm=self.qk_norm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # HF rounds the normaliser to the model's dtype first (sqrt(3072) is 55.5 in bfloat16).
        scale = torch.full((), self.config.hidden_size ** 0.5, dtype=torch.float32, device=x.device)
        return x * scale.to(x.dtype)

    def position_embeddings(self, positions: torch.Tensor,
                            dtype: torch.dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The global layers' cos/sin tables and the sliding layers'."""
        full = self.model.rotary_emb(positions, dtype)
        local = self.model.local_rotary_emb
        return full, (local(positions, dtype) if local is not None else full)


#: transformers' ``Gemma2Config`` defaults that shape the model, for config.json files that
#: leave them out (``null`` stays null: no soft-cap, no window).
GEMMA2_HF_DEFAULTS = {
    "head_dim": 256, "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 10000.0,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
}
#: llama.cpp's names of Gemma's sandwich norms (``blk.N.<name>.weight``), as the model's.
GEMMA_GGUF_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gemma_hf_fields(config: Mapping[str, Any], generation_config: Mapping[str, Any] | None,
                    architecture: str, layer_types: Sequence[str]) -> dict[str, Any]:
    """The :class:`GemmaConfig` fields Gemma 2 and 3 read alike from a config.json (with its
    family's defaults filled in); ``layer_types``: each layer's kind where config.json does
    not list them."""
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"{architecture} with use_bidirectional_attention=true (an embedding model) "
                         f"is not supported")
    get = HFConfigReader(config, architecture)
    qkv_bias = bool(get("attention_bias", False))
    window = config.get("sliding_window")
    return dict(
        common_hf_fields(config, generation_config, architecture),
        hidden_activation=get("hidden_activation"),
        attention_bias=qkv_bias,
        attention_output_bias=qkv_bias,
        attention_scale=float(get("query_pre_attn_scalar")) ** -0.5,
        sliding_window=window or None,
        layer_types=tuple(get("layer_types", layer_types)),
        final_logit_softcapping=config.get("final_logit_softcapping") or None,
    )


def with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``defaults`` for the keys it lacks (a key set to null stays null)."""
    return {**defaults, **config}


def gguf_layer_types(pattern: int | Sequence[Any], num_layers: int) -> tuple[str, ...]:
    """Each layer's kind as llama.cpp reads ``attention.sliding_window_pattern``: a flag per
    layer, or ``n``: every ``n``-th layer global, the others sliding (0: all sliding)."""
    if not isinstance(pattern, int):
        if len(pattern) != num_layers:
            raise ValueError(f"attention.sliding_window_pattern has {len(pattern)} entries for {num_layers} layers")
        return tuple(SLIDING if flag else FULL for flag in pattern)
    return tuple(SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(num_layers))


def gguf_attention_scale(fields: Mapping[str, Any], layers_of_27b: int) -> float | None:
    """llama.cpp's Gemma scale (its GGUF has no ``query_pre_attn_scalar``): ``head_dim ** -0.5``
    (None here), except for the 27B model, told apart by its layer count:
    ``(hidden_size // heads) ** -0.5``."""
    get = GGUFFieldReader(fields, fields["general.architecture"])
    if get("block_count") != layers_of_27b:
        return None
    return float(get("embedding_length") // get("attention.head_count")) ** -0.5


class Gemma2Family(ModelFamily):
    name = "gemma2"
    hf_architectures = {"Gemma2ForCausalLM": "gemma2"}
    gguf_architectures = ("gemma2",)

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> ModelConfig:
        config = with_defaults(config, GEMMA2_HF_DEFAULTS)
        # transformers' default: layers 0, 2, 4... slide, 1, 3, 5... attend globally.
        alternating = [SLIDING if (i + 1) % 2 else FULL for i in range(config.get("num_hidden_layers") or 0)]
        fields = gemma_hf_fields(config, generation_config, "Gemma2ForCausalLM", alternating)
        return GemmaConfig(**fields, attn_logit_softcapping=config.get("attn_logit_softcapping") or None)

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        common = common_gguf_fields(fields, tensor_shapes, "Gemma2ForCausalLM")
        get = GGUFFieldReader(fields, "gemma2")
        # llama.cpp's defaults for what the file leaves out.
        local_theta = float(get("rope.freq_base_swa", common["rope_theta"]))
        own_local_rope = local_theta != common["rope_theta"]  # scaled as the global layers are
        return GemmaConfig(
            **common,
            sliding_window=get("attention.sliding_window", 4096) or None,
            layer_types=gguf_layer_types(get("attention.sliding_window_pattern", 2), common["num_hidden_layers"]),
            attention_scale=gguf_attention_scale(fields, layers_of_27b=46),
            attn_logit_softcapping=get("attn_logit_softcapping", 50.0) or None,
            final_logit_softcapping=get("final_logit_softcapping", 30.0) or None,
            local_rope_theta=local_theta if own_local_rope else None,
            local_rope_scaling=common["rope_scaling"] if own_local_rope else None,
        )

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return GemmaForCausalLM(config, parallel)

    def gguf_layer_names(self) -> Mapping[str, str]:
        return {**super().gguf_layer_names(), **GEMMA_GGUF_LAYER_NAMES}

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        if name.endswith("norm.weight"):  # llama.cpp's converter stored 1 + weight
            tensor = tensor.float() - 1.0
        yield from super().gguf_tensors(config, name, tensor)


FAMILIES = [Gemma2Family()]
