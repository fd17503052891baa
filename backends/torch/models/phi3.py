"""The Phi-3 family: Phi-3 and Phi-3.5 mini, Phi-4-mini (HF ``Phi3ForCausalLM``, GGUF ``phi3``).

A Llama layer (RMSNorm before attention and before the SwiGLU MLP, grouped-query
attention, no biases) with three differences:

- Fused checkpoint tensors. HF stores ``self_attn.qkv_proj`` (rows: every query head,
  then the key heads, then the value heads) and ``mlp.gate_up_proj`` (the gate's rows,
  then the up projection's); llama.cpp's converter keeps both layouts as they are, as
  ``attn_qkv`` and a fused ``ffn_up``, unpermuted. They are split into q/k/v and gate/up
  as they load, so tensor parallelism cuts each part at its own heads or rows; the
  engine fuses each rank's parts again (``fuse_projections``).

- Partial rotary embeddings (Phi-4-mini's ``partial_rotary_factor`` 0.75, GGUF's
  ``rope.dimension_count`` below the head size): only the first ``rotary_dim``
  dimensions of each head rotate.

- LongRoPE (``rope_scaling`` type ``longrope``, formerly ``su``; transformers reads
  ``yarn`` as the same for Phi-3): the inverse frequencies are divided by
  per-frequency ``short_factor`` or ``long_factor``, and cos/sin are multiplied by an
  attention factor (``attention_factor``, else ``sqrt(1 + ln(factor) /
  ln(original_max_position_embeddings))`` with ``factor`` = ``max_position_embeddings
  / original_max_position_embeddings`` unless given). GGUF files carry the factors as
  the tensors ``rope_factors_short``/``rope_factors_long`` and the attention factor as
  ``rope.scaling.attn_factor``.

Which factors. transformers picks them per forward pass by the longest position in it
(``seq_len > original_max_position_embeddings``: long, for every position), and its
``generate`` throws its cache away and recomputes the whole sequence with the long
factors on the step the sequence first outgrows ``original_max_position_embeddings``.
An engine whose KV cache keeps each key as it was rotated, and whose steps mix many
sequences, cannot do either: choosing by the step would make a sequence's logits depend
on its neighbours, and choosing by each token's own position would rotate one
sequence's early keys with the short factors and its later queries with the long ones
(no longer a function of relative position at all). So the choice is made once, for
the model, by the longest sequence it serves, as llama.cpp (by its context size) and
vLLM (by ``max_model_len``) do: the long factors when ``max_position_embeddings``
exceeds ``original_max_position_embeddings`` (every Phi-3 128k model), the short ones
otherwise. What that gives against transformers:

- a sequence that is longer than ``original_max_position_embeddings`` from its prompt
  on: exactly transformers' logits (tests/backends/families/test_phi3.py);
- a sequence that never reaches it, on a model whose context does not exceed it:
  exactly transformers' logits (the same test);
- a sequence that never reaches it on a long-context model: the long factors where
  transformers uses the short ones (close, not equal; LongRoPE's long factors are
  trained to serve short sequences too, at some cost);
- a sequence that crosses it: transformers' logits from the step it crosses on (where
  transformers recomputes everything with the long factors too), given the same tokens
  before it, which transformers chose with the short factors.

Sliding window: transformers applies ``sliding_window`` (Phi-3-mini-4k's 2047) to every
layer, so this family does, from config.json and from GGUF's
``attention.sliding_window`` alike (0: none; llama.cpp itself ignores it for Phi-3).
Dropout settings (``attention_dropout``, ``resid_pdrop``, ``embd_pdrop``) do nothing at
inference and are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.model_config import (
    GGUFFieldReader,
    HFConfigReader,
    ModelConfig,
    common_gguf_fields,
    common_hf_fields,
)
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.family import LAYER_TENSOR, ModelFamily, Tensors
from lmserve.backends.torch.models.decoder_layer import DecoderLayer
from lmserve.backends.torch.models.rotary import LongRoPE, RotaryEmbedding
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel

ARCHITECTURE = "Phi3ForCausalLM"
#: ``rope_type`` names transformers' Phi3Config reads as LongRoPE.
LONGROPE_TYPES = ("longrope", "su", "yarn")
#: Phi3Config's defaults, for keys a config.json leaves out.
DEFAULT_ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096
DEFAULT_MAX_POSITION_EMBEDDINGS = 4096
DEFAULT_RMS_NORM_EPS = 1e-5
#: llama.cpp's global tensors of LongRoPE factors.
GGUF_LONG_FACTORS, GGUF_SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


@dataclass(frozen=True)
class Phi3ModelConfig(ModelConfig):
    """A Phi-3 model's shape: :class:`ModelConfig` with partial rotary and LongRoPE."""

    #: Leading dimensions of each head that rotate (None: all of ``head_dim``).
    rotary_dim: int | None = None
    #: LongRoPE scaling (None: plain RoPE).
    longrope: LongRoPE | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"the rotary dimension must be even and in (0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim}")
        longrope, half = self.longrope, (self.rotary_dim or self.head_dim) // 2
        if longrope is not None:
            for name in ("short_factor", "long_factor"):
                factors = getattr(longrope, name)
                if factors is not None and len(factors) != half:
                    raise ValueError(f"LongRoPE {name} has {len(factors)} entries, the rotary dimension "
                                     f"{2 * half} needs {half}")
            if not longrope.original_max_position_embeddings > 0:
                raise ValueError("LongRoPE needs original_max_position_embeddings > 0")

    @property
    def uses_long_factors(self) -> bool:
        """Whether every position rotates with LongRoPE's long factors (see the module's docstring)."""
        return self.longrope is not None and self.longrope.uses_long_factors(self.max_position_embeddings)


class Phi3ForCausalLM(CausalLM):
    """HF transformers' ``Phi3ForCausalLM``: Llama's layer, Phi-3's rotary embedding."""

    def __init__(self, config: Phi3ModelConfig, parallel: TensorParallel = SINGLE):
        super().__init__(config, parallel)
        self.model.rotary_emb = phi3_rotary_embedding(config)

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        return DecoderLayer(config, layer_idx, parallel)


def phi3_rotary_embedding(config: Phi3ModelConfig) -> RotaryEmbedding:
    """The rotary embedding of ``config``: its rotary dimension, and LongRoPE's factors of the
    kind the model uses (None until a GGUF file's tensor gives them) and attention factor."""
    longrope = config.longrope
    if longrope is None:
        return RotaryEmbedding(config, config.rotary_dim)
    factors = longrope.long_factor if config.uses_long_factors else longrope.short_factor
    return RotaryEmbedding(config, config.rotary_dim, factors, longrope.attention_factor)


class Phi3Family(ModelFamily):
    name = "phi3"
    hf_architectures = {ARCHITECTURE: "phi3"}
    gguf_architectures = ("phi3",)

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> Phi3ModelConfig:
        get = HFConfigReader(config, ARCHITECTURE)
        if get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
        # The rope keys are read here (common_hf_fields refuses partial rotary and LongRoPE).
        plain = {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_scaling", "partial_rotary_factor")}
        fields = common_hf_fields(plain, generation_config, ARCHITECTURE)
        # transformers' Phi3Config: rope_scaling, if set, wins over rope_parameters.
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        rotary_factor = float(rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)))
        rotary_dim = int(fields["head_dim"] * rotary_factor)
        if not (0 < rotary_dim <= fields["head_dim"] and rotary_dim % 2 == 0):
            raise ValueError(f"partial_rotary_factor {rotary_factor} gives an odd or empty rotary dimension "
                             f"({rotary_dim} of head_dim {fields['head_dim']})")
        max_positions = get("max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS)
        fields.update(rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
                      max_position_embeddings=max_positions,
                      rms_norm_eps=float(get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)))
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", *LONGROPE_TYPES):
            raise ValueError(f"Phi-3 rope_scaling type {rope_type!r} is not supported; supported: default, longrope")
        longrope = None
        if rope_type in LONGROPE_TYPES:
            # transformers takes the top-level value (Phi3Config's default 4096), not rope_scaling's.
            original = get("original_max_position_embeddings", DEFAULT_ORIGINAL_MAX_POSITION_EMBEDDINGS)
            factor = rope.get("factor")
            if factor is None:
                factor = max_positions / original
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = LongRoPE.default_attention_factor(factor, original)
            factors = {}
            for name in ("short_factor", "long_factor"):
                if not isinstance(rope.get(name), list):
                    raise ValueError(f"LongRoPE rope_scaling lacks the list {name!r}")
                factors[name] = tuple(float(f) for f in rope[name])
            longrope = LongRoPE(original, float(attention_factor), **factors)
        return Phi3ModelConfig(**fields, sliding_window=get("sliding_window", None),
                               rotary_dim=rotary_dim if rotary_dim != fields["head_dim"] else None,
                               longrope=longrope)

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> Phi3ModelConfig:
        arch = fields["general.architecture"]
        get = GGUFFieldReader(fields, arch)
        # The rotary dimension is read here (common_gguf_fields refuses partial rotary).
        dimension_key = f"{arch}.rope.dimension_count"
        common = common_gguf_fields({k: v for k, v in fields.items() if k != dimension_key}, tensor_shapes,
                                    ARCHITECTURE)
        head_dim = common["head_dim"]
        rotary_dim = get("rope.dimension_count", head_dim)
        longrope = None
        factor_tensors = [name for name in (GGUF_SHORT_FACTORS, GGUF_LONG_FACTORS) if name in tensor_shapes]
        if factor_tensors:
            if len(factor_tensors) != 2:
                raise ValueError(f"GGUF file has {factor_tensors[0]} without its pair "
                                 f"({GGUF_SHORT_FACTORS}, {GGUF_LONG_FACTORS})")
            for name in factor_tensors:
                if tuple(tensor_shapes[name]) != (rotary_dim // 2,):
                    raise ValueError(f"GGUF tensor {name} has shape {tensor_shapes[name]}, the rotary "
                                     f"dimension {rotary_dim} needs ({rotary_dim // 2},)")
            longrope = LongRoPE(get("rope.scaling.original_context_length"),
                                float(get("rope.scaling.attn_factor", 1.0)))
        return Phi3ModelConfig(**common, sliding_window=get("attention.sliding_window", 0) or None,
                               rotary_dim=rotary_dim if rotary_dim != head_dim else None, longrope=longrope)

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        return Phi3ForCausalLM(config, parallel)

    def hf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        match = LAYER_TENSOR.match(name)
        if match is not None and match.group(2) in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            layer, module, kind = match.groups()
            yield from split_fused(config, f"model.layers.{layer}.", module.split(".")[-1], kind, tensor, name)
            return
        yield from super().hf_tensors(config, name, tensor)

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        match = LAYER_TENSOR.match(name)
        if match is not None and match.group(2) in ("attn_qkv", "ffn_up"):
            layer, module, kind = match.groups()
            fused = "qkv_proj" if module == "attn_qkv" else "gate_up_proj"
            yield from split_fused(config, f"model.layers.{layer}.", fused, kind, tensor, name)
            return
        yield from super().gguf_tensors(config, name, tensor)

    def load_gguf_buffer(self, model: CausalLM, name: str, tensor: torch.Tensor) -> bool:
        """llama.cpp's LongRoPE factors: the kind the model uses divides its frequencies, the
        other is read and dropped."""
        if name not in (GGUF_SHORT_FACTORS, GGUF_LONG_FACTORS):
            return False
        if (name == GGUF_LONG_FACTORS) == model.config.uses_long_factors:
            model.model.rotary_emb.reset_parameters(freq_factors=tensor)
        return True


def split_fused(config: ModelConfig, prefix: str, fused: str, kind: str, tensor: torch.Tensor,
                source_name: str) -> Tensors:
    """Phi-3's fused ``qkv_proj`` (query heads, key heads, value heads) or ``gate_up_proj``
    (gate rows, then up rows) as the model's separate projections."""
    if fused == "qkv_proj":
        kv_rows = config.num_key_value_heads * config.head_dim
        sizes = {"self_attn.q_proj": config.num_attention_heads * config.head_dim,
                 "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows}
    else:
        sizes = {"mlp.gate_proj": config.intermediate_size, "mlp.up_proj": config.intermediate_size}
    if tensor.shape[0] != sum(sizes.values()):
        raise ValueError(f"tensor {source_name} has {tensor.shape[0]} rows, the model's "
                         f"{' + '.join(sizes)} need {sum(sizes.values())}")
    for (module, _), part in zip(sizes.items(), tensor.split(list(sizes.values())), strict=True):
        yield f"{prefix}{module}.{kind}", part


FAMILIES = [Phi3Family()]
