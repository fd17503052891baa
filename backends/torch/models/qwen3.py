"""The Qwen3 family (dense): Llama's layer with an RMSNorm over every query and key head
before the rotary embedding (``q_norm``/``k_norm``, one ``head_dim`` weight each), biases
on q/k/v/o only when ``attention_bias``, and sliding windows on the layers HF's
``layer_types`` names (``use_sliding_window``; from ``max_window_layers`` on by default).
llama.cpp's ``qwen3`` GGUF files keep HF's q/k row order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lmserve.backends.torch.model_config import HFConfigReader, ModelConfig, common_gguf_fields, common_hf_fields
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.decoder_layer import DecoderLayer
from lmserve.backends.torch.models.family import ModelFamily
from lmserve.backends.torch.models.norms import RMSNorm
from lmserve.backends.torch.tensor_parallel import TensorParallel


class Qwen3ForCausalLM(CausalLM):
    """HF transformers' ``Qwen3ForCausalLM``."""

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return DecoderLayer(config, layer_idx, parallel, qk_norm=RMSNorm)


def qwen3_attention_fields(config: Mapping[str, Any], architecture: str, *, per_layer_windows: bool) -> dict[str, Any]:
    """Qwen3's and Qwen3-MoE's attention fields beyond the common ones: one bias switch for
    q/k/v/o, and a sliding window only with ``use_sliding_window``; on every layer
    (``per_layer_windows`` False: Qwen3-MoE) or on those HF's ``layer_types`` name (Qwen3)."""
    get = HFConfigReader(config, architecture)
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
    bias = bool(get("attention_bias", False))
    fields: dict[str, Any] = dict(attention_bias=bias, attention_output_bias=bias)
    if get("use_sliding_window", False):
        fields["sliding_window"] = get("sliding_window")
        if per_layer_windows:
            first_sliding = get("max_window_layers", 28)
            fields["layer_types"] = get("layer_types", None) or [
                "sliding_attention" if i >= first_sliding else "full_attention"
                for i in range(get("num_hidden_layers"))]
    return fields


class Qwen3Family(ModelFamily):
    name = "qwen3"
    hf_architectures = {"Qwen3ForCausalLM": "qwen3"}
    gguf_architectures = ("qwen3",)

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> ModelConfig:
        architecture = "Qwen3ForCausalLM"
        return ModelConfig(**common_hf_fields(config, generation_config, architecture),
                           **qwen3_attention_fields(config, architecture, per_layer_windows=True))

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        return ModelConfig(**common_gguf_fields(fields, tensor_shapes, "Qwen3ForCausalLM"))

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return Qwen3ForCausalLM(config, parallel)


FAMILIES = [Qwen3Family()]
