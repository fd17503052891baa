"""The Gemma 3 family (its text model, ``Gemma3ForCausalLM``): Gemma 2's layers
(:mod:`.gemma2`) with per-head q/k norms (``1 + weight``, like every Gemma norm), five
sliding-window layers to each global one, and two rotary bases: ``rope_local_base_freq``
for the sliding layers, ``rope_theta`` with ``rope_scaling`` (linear, factor 8, in the
larger models) for the global ones. No attention soft-cap (transformers does not apply
``attn_logit_softcapping`` to Gemma 3, nor does llama.cpp); the final one if configured.

transformers 5 writes the rotary settings per layer kind (``rope_parameters`` keyed by
``"full_attention"``/``"sliding_attention"``); the checkpoints of transformers 4 carry
``rope_theta``, ``rope_scaling``, ``rope_local_base_freq`` and ``sliding_window_pattern``;
both read the same here. The vision model (``Gemma3ForConditionalGeneration``) is not run;
llama.cpp's GGUF of it holds the text model alone and is.

llama.cpp's GGUF says which layers slide only through its own assumption (every sixth
layer global, unless ``attention.sliding_window_pattern`` is set) and gives the sliding
layers ``rope.freq_base_swa`` (10000 where absent) without scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmserve.backends.torch.model_config import (
    GGUFFieldReader,
    ModelConfig,
    common_gguf_fields,
    hf_rope,
)
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.gemma2 import (
    FULL,
    SLIDING,
    Gemma2Family,
    GemmaConfig,
    GemmaForCausalLM,
    gemma_hf_fields,
    gguf_attention_scale,
    gguf_layer_types,
    with_defaults,
)
from lmserve.backends.torch.models.norms import OffsetRMSNorm
from lmserve.backends.torch.tensor_parallel import TensorParallel


class Gemma3ForCausalLM(GemmaForCausalLM):
    """HF transformers' ``Gemma3ForCausalLM``."""

    qk_norm = OffsetRMSNorm


#: transformers' ``Gemma3TextConfig`` defaults that shape the model (see Gemma 2's).
GEMMA3_HF_DEFAULTS = {
    "head_dim": 256, "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
}
#: transformers' default rotary bases of the global and the sliding layers.
DEFAULT_GLOBAL_THETA, DEFAULT_LOCAL_THETA = 1_000_000.0, 10_000.0


def gemma3_hf_rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """The global and the sliding layers' (theta, scaling) as :class:`GemmaConfig` fields,
    as transformers 5 reads them: its per-kind ``rope_parameters``, or the older
    ``rope_theta`` + ``rope_scaling`` (global layers) and ``rope_local_base_freq``."""
    params = config.get("rope_parameters") or {}
    full = dict(params.get(FULL) or {"rope_type": "default"})
    full.update(config.get("rope_scaling") or {})
    full.setdefault("rope_theta", config.get("rope_theta") or DEFAULT_GLOBAL_THETA)
    sliding = dict(params.get(SLIDING) or {"rope_type": "default"})
    sliding.setdefault("rope_theta", config.get("rope_local_base_freq") or DEFAULT_LOCAL_THETA)
    theta, scaling = hf_rope({"rope_parameters": full})
    local_theta, local_scaling = hf_rope({"rope_parameters": sliding})
    return {"rope_theta": theta, "rope_scaling": scaling, "local_rope_theta": local_theta,
            "local_rope_scaling": local_scaling}


class Gemma3Family(Gemma2Family):
    name = "gemma3"
    hf_architectures = {"Gemma3ForCausalLM": "gemma3_text"}
    gguf_architectures = ("gemma3",)

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> ModelConfig:
        if "text_config" in config or "vision_config" in config:
            raise ValueError("Gemma 3 with a vision model (Gemma3ForConditionalGeneration) is not supported: "
                             "only its text model, Gemma3ForCausalLM")
        config = with_defaults(config, GEMMA3_HF_DEFAULTS)
        # transformers' default: every sliding_window_pattern-th layer global, the others sliding.
        pattern = config.get("sliding_window_pattern") or 6
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(config.get("num_hidden_layers") or 0)]
        fields = gemma_hf_fields(config, generation_config, "Gemma3ForCausalLM", layer_types)
        return GemmaConfig(**{**fields, **gemma3_hf_rope(config)})

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        common = common_gguf_fields(fields, tensor_shapes, "Gemma3ForCausalLM")
        get = GGUFFieldReader(fields, "gemma3")
        num_layers = common["num_hidden_layers"]
        window = get("attention.sliding_window", 0)
        if window:
            layer_types = gguf_layer_types(get("attention.sliding_window_pattern", 6), num_layers)
            local_theta = float(get("rope.freq_base_swa", DEFAULT_LOCAL_THETA))
        else:  # llama.cpp: no window, every layer global
            layer_types, local_theta = (FULL,) * num_layers, None
        return GemmaConfig(
            **common,
            sliding_window=window or None,
            layer_types=layer_types,
            attention_scale=gguf_attention_scale(fields, layers_of_27b=62),
            final_logit_softcapping=get("final_logit_softcapping", 0.0) or None,
            local_rope_theta=local_theta,
        )

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return Gemma3ForCausalLM(config, parallel)


FAMILIES = [Gemma3Family()]
