"""The Llama family: Llama 2/3, Mistral, Qwen2, InternLM2 and SmolLM.

RMSNorm before attention and before the MLP, rotary embeddings, grouped-query
attention, a SwiGLU MLP; the members differ in biases (Qwen2's q/k/v, InternLM2's
and ``attention_bias`` Llamas' o_proj too), Mistral's sliding window and InternLM2's
fused ``wqkv`` checkpoint layout. llama.cpp's converter stores the ``llama`` and
``internlm2`` GGUF q/k rows permuted (each head's rotary halves interleaved); they
are put back in HF's order as they load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.model_config import (
    HFConfigReader,
    ModelConfig,
    common_gguf_fields,
    common_hf_fields,
)
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.decoder_layer import DecoderLayer
from lmserve.backends.torch.models.family import LAYER_TENSOR, ModelFamily, Tensors
from lmserve.backends.torch.tensor_parallel import TensorParallel


class LlamaForCausalLM(CausalLM):
    """HF transformers' ``LlamaForCausalLM`` (and its Mistral, Qwen2, InternLM2 kin)."""

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return DecoderLayer(config, layer_idx, parallel)


#: InternLM2's HF names of a layer's modules, as the model's.
_INTERNLM2_LAYER_NAMES = {
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_INTERNLM2_GLOBAL_NAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight",
                           "model.norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
#: GGUF architectures whose q/k weights llama.cpp's converter permuted.
_PERMUTED_GGUF_ARCHITECTURES = {"LlamaForCausalLM", "InternLM2ForCausalLM"}


class LlamaFamily(ModelFamily):
    name = "llama"
    hf_architectures = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                        "Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}
    gguf_architectures = ("llama", "qwen2", "internlm2")

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> ModelConfig:
        names = [n for n in config.get("architectures") or () if n in self.hf_architectures]
        architecture = names[0] if names else next(
            n for n, model_type in self.hf_architectures.items() if model_type == config.get("model_type"))
        get = HFConfigReader(config, architecture)
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
        if get("mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        qkv_bias = out_bias = bool(get("attention_bias", False))
        sliding_window = None
        if architecture == "Qwen2ForCausalLM":
            qkv_bias, out_bias = True, False
            if get("use_sliding_window", False):
                raise ValueError("Qwen2 with use_sliding_window=true is not supported")
        elif architecture == "InternLM2ForCausalLM":
            qkv_bias = out_bias = bool(get("bias", True))  # InternLM2's own default
        elif architecture == "MistralForCausalLM":
            sliding_window = get("sliding_window", None)
        return ModelConfig(**common_hf_fields(config, generation_config, architecture),
                           attention_bias=qkv_bias, attention_output_bias=out_bias, sliding_window=sliding_window)

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        hf_name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "internlm2": "InternLM2ForCausalLM"}[fields["general.architecture"]]
        return ModelConfig(**common_gguf_fields(fields, tensor_shapes, hf_name))

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return LlamaForCausalLM(config, parallel)

    def hf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        if config.architecture != "InternLM2ForCausalLM":
            yield from super().hf_tensors(config, name, tensor)
            return
        if name in _INTERNLM2_GLOBAL_NAMES:
            yield from super().hf_tensors(config, _INTERNLM2_GLOBAL_NAMES[name], tensor)
            return
        match = LAYER_TENSOR.match(name)
        if match is None:
            yield name, tensor
            return
        layer, module, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if module == "attention.wqkv":
            # Rows are grouped per kv head: [q_per_kv query heads, one key head, one value head].
            grouped = tensor.reshape(config.num_key_value_heads, config.num_queries_per_kv + 2,
                                     config.head_dim, *tensor.shape[1:])
            yield prefix + f"self_attn.q_proj.{kind}", grouped[:, :-2].reshape(-1, *tensor.shape[1:])
            yield prefix + f"self_attn.k_proj.{kind}", grouped[:, -2].reshape(-1, *tensor.shape[1:])
            yield prefix + f"self_attn.v_proj.{kind}", grouped[:, -1].reshape(-1, *tensor.shape[1:])
        elif module in _INTERNLM2_LAYER_NAMES:
            yield prefix + f"{_INTERNLM2_LAYER_NAMES[module]}.{kind}", tensor
        else:
            yield name, tensor

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        if config.architecture in _PERMUTED_GGUF_ARCHITECTURES and (".attn_q." in name or ".attn_k." in name):
            num_heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            tensor = unpermute_qk(tensor, num_heads)
        yield from super().gguf_tensors(config, name, tensor)


def unpermute_qk(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Its converter stores, per head, the
    rows ``reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)`` so that
    rotary pairs are adjacent; HF's rotate_half layout wants the halves apart."""
    rest = tensor.shape[1:]
    half = tensor.shape[0] // num_heads // 2
    return tensor.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(tensor.shape)


FAMILIES = [LlamaFamily()]
