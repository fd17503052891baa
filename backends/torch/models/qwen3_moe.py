"""The Qwen3-MoE family: Qwen3's attention (per-head q/k norms) and a sparse
mixture-of-experts MLP (:mod:`~lmserve.backends.torch.models.moe`), with the top-k weights
renormalised only when ``norm_topk_prob``. Layers listed in ``mlp_only_layers``, or off
the ``decoder_sparse_step`` (layer ``i`` is sparse when ``(i + 1) % step == 0``), have a
dense MLP of ``intermediate_size``. llama.cpp's ``qwen3moe`` files keep no
``norm_topk_prob``: llama.cpp always renormalises, and so do these files here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lmserve.backends.torch.model_config import HFConfigReader, ModelConfig, common_gguf_fields, common_hf_fields
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.moe import MoEConfig, MoEFamily, moe_decoder_layer, moe_gguf_fields
from lmserve.backends.torch.models.norms import RMSNorm
from lmserve.backends.torch.models.qwen3 import qwen3_attention_fields
from lmserve.backends.torch.tensor_parallel import TensorParallel


class Qwen3MoeForCausalLM(CausalLM):
    """HF transformers' ``Qwen3MoeForCausalLM``."""

    compiled_decodes = False  # the experts a step runs depend on its tokens

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return moe_decoder_layer(config, layer_idx, parallel, qk_norm=RMSNorm)


class Qwen3MoeFamily(MoEFamily):
    name = "qwen3_moe"
    hf_architectures = {"Qwen3MoeForCausalLM": "qwen3_moe"}
    gguf_architectures = ("qwen3moe",)

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> MoEConfig:
        architecture = "Qwen3MoeForCausalLM"
        get = HFConfigReader(config, architecture)
        # transformers 5 writes num_experts as num_local_experts (an alias); the hub's configs say num_experts.
        num_experts = get("num_experts", None)
        if num_experts is None:
            num_experts = get("num_local_experts", 0)
        step, dense_only = get("decoder_sparse_step", 1), set(get("mlp_only_layers", ()))
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"decoder_sparse_step must be a positive integer, got {step!r}")
        dense_layers = [i for i in range(get("num_hidden_layers"))
                        if i in dense_only or num_experts <= 0 or (i + 1) % step]
        return MoEConfig(**common_hf_fields(config, generation_config, architecture),
                         **qwen3_attention_fields(config, architecture, per_layer_windows=False),
                         num_experts=num_experts, num_experts_per_tok=get("num_experts_per_tok"),
                         moe_intermediate_size=get("moe_intermediate_size"),
                         norm_topk_prob=bool(get("norm_topk_prob", False)), dense_layers=tuple(dense_layers))

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> MoEConfig:
        return MoEConfig(**common_gguf_fields(fields, tensor_shapes, "Qwen3MoeForCausalLM"),
                         **moe_gguf_fields(fields, tensor_shapes))

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return Qwen3MoeForCausalLM(config, parallel)


FAMILIES = [Qwen3MoeFamily()]
