"""The Mixtral family: Mistral's attention (no biases, an optional sliding window on every
layer) and a sparse mixture-of-experts MLP in every layer
(:mod:`~lmserve.backends.torch.models.moe`), the top-k weights always renormalised.

Hub checkpoints name the MLP ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up)
and ``w2`` (down); transformers 5 may save the fused 3-D layout under ``mlp`` instead.
llama.cpp's converter writes Mixtral as the ``llama`` GGUF architecture with stacked
expert tensors and q/k rows permuted as for Llama: this family claims the ``llama`` files
that have experts (``llama.expert_count`` > 0) and comes before the Llama family.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.model_config import HFConfigReader, ModelConfig, common_gguf_fields, common_hf_fields
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.family import Tensors
from lmserve.backends.torch.models.llama import unpermute_qk
from lmserve.backends.torch.models.moe import MoEConfig, MoEFamily, moe_decoder_layer, moe_gguf_fields
from lmserve.backends.torch.tensor_parallel import TensorParallel

#: The hub's names of an expert's projections, as the model's.
_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_HUB_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.")


class MixtralForCausalLM(CausalLM):
    """HF transformers' ``MixtralForCausalLM``."""

    compiled_decodes = False  # the experts a step runs depend on its tokens

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return moe_decoder_layer(config, layer_idx, parallel)


class MixtralFamily(MoEFamily):
    name = "mixtral"
    hf_architectures = {"MixtralForCausalLM": "mixtral"}
    gguf_architectures = ("llama",)

    def claims_gguf(self, fields: Mapping[str, Any]) -> bool:
        """A ``llama`` file with experts (a plain ``llama`` one is the Llama family's)."""
        return super().claims_gguf(fields) and (fields.get("llama.expert_count") or 0) > 0

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> MoEConfig:
        architecture = "MixtralForCausalLM"
        get = HFConfigReader(config, architecture)
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
        return MoEConfig(**common_hf_fields(config, generation_config, architecture),
                         sliding_window=get("sliding_window", None), num_experts=get("num_local_experts"),
                         num_experts_per_tok=get("num_experts_per_tok"),
                         moe_intermediate_size=get("intermediate_size"), norm_topk_prob=True)

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> MoEConfig:
        moe = moe_gguf_fields(fields, tensor_shapes)
        if moe["dense_layers"]:
            raise ValueError(f"a Mixtral GGUF file has experts in every layer; layers {list(moe['dense_layers'])} "
                             f"have none")
        return MoEConfig(**common_gguf_fields(fields, tensor_shapes, "MixtralForCausalLM"), **moe)

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return MixtralForCausalLM(config, parallel)

    def hf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        name = _HUB_EXPERT.sub(lambda m: f".mlp.experts.{m.group(1)}.{_EXPERT_PROJECTIONS[m.group(2)]}.", name)
        yield from super().hf_tensors(config, name.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor)

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        if ".attn_q." in name or ".attn_k." in name:  # permuted by the converter, as for Llama
            tensor = unpermute_qk(tensor, config.num_attention_heads if ".attn_q." in name
                                  else config.num_key_value_heads)
        yield from super().gguf_tensors(config, name, tensor)


FAMILIES = [MixtralFamily()]
