"""A model family lmserve does not ship: "hello", a Llama whose layers are parallel.

Each layer normalises its input once and adds attention and MLP of that one input to the
residual stream (``x + attn(norm(x)) + mlp(norm(x))``, as GPT-J and Falcon wire theirs),
where a Llama layer runs them one after the other with a norm each. The family claims
HF checkpoints whose ``config.json`` says ``"architectures": ["HelloForCausalLM"]``; the
plugin contributes it through the ``lmserve_model_families`` hook (lmserve_hello_plugin.py).

Everything else comes from lmserve's building blocks: the config reader, attention over
the paged KV cache, the gated MLP, tensor parallelism, the HF tensor names.
"""

from __future__ import annotations

from lmserve import Attention, CausalLM, GatedMLP, ModelConfig, ModelFamily, RMSNorm, common_hf_fields
from torch import nn


class ParallelLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, parallel)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, parallel)

    def forward(self, x, rope, kv_cache, metadata):
        h = self.input_layernorm(x)
        return x + self.self_attn(h, rope, kv_cache, metadata) + self.mlp(h)


class HelloForCausalLM(CausalLM):
    def make_layer(self, config, layer_idx, parallel):
        return ParallelLayer(config, layer_idx, parallel)


class HelloFamily(ModelFamily):
    name = "hello"
    hf_architectures = {"HelloForCausalLM": "hello"}

    def read_hf_config(self, config, generation_config):
        return ModelConfig(**common_hf_fields(config, generation_config, "HelloForCausalLM"))

    def build_model(self, config, parallel):
        return HelloForCausalLM(config, parallel)
