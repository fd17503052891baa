"""A model family: which checkpoints it runs and how (the unit :hook:`lmserve_model_families`
contributes).

The engine knows no architecture by name. A checkpoint's ``architectures`` (config.json)
or ``general.architecture`` (GGUF) picks the first family that claims it; the family
reads the config into a :class:`~lmserve.backends.torch.model_config.ModelConfig`,
builds the :class:`~lmserve.backends.torch.models.causal_lm.CausalLM` that runs it and
maps the checkpoint's tensor names (and layouts) onto the model's parameters. The
defaults below are what most families share: HF names as they are, llama.cpp's
standard GGUF names, tensor parallelism wherever the heads divide.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.tensor_parallel import TensorParallel, check_size

#: A checkpoint tensor's name and its data, as the model's parameter name and data
#: (none, one or several: a fused tensor splits into its parts).
Tensors = Iterator[tuple[str, torch.Tensor]]

#: llama.cpp's GGUF names outside the layers, as the model's.
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: llama.cpp's names of a layer's modules (``blk.N.<name>.weight``), as the model's.
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
LAYER_TENSOR = re.compile(r"^(?:model\.layers|blk)\.(\d+)\.(.+)\.(weight|bias)$")


class ModelFamily:
    """One family of decoder-only models. Subclass it, set the class attributes and
    implement :meth:`read_hf_config` and :meth:`build_model`; override the rest where
    the family's checkpoints differ. Instances are stateless: the engine's other ranks
    get the family by pickling it (define it at a module's top level)."""

    #: Short name, for messages and docs ("qwen3").
    name: str = ""
    #: HF ``architectures`` entries it runs ("Qwen3ForCausalLM"), and the ``model_type``
    #: each stands for, for configs without ``architectures``.
    hf_architectures: Mapping[str, str] = {}
    #: GGUF ``general.architecture`` values it runs ("qwen3").
    gguf_architectures: tuple[str, ...] = ()

    def claims_gguf(self, fields: Mapping[str, Any]) -> bool:
        """Whether this family runs a GGUF file with these metadata: by default, when its
        ``general.architecture`` is one of :attr:`gguf_architectures`. A family sharing an
        architecture name with another looks further (Mixtral is llama.cpp's ``llama``
        with experts) and comes before it in the order families are tried."""
        return fields.get("general.architecture") in self.gguf_architectures

    def read_hf_config(self, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None) -> ModelConfig:
        """The model's shape from an HF ``config.json`` (and ``generation_config.json``);
        ValueError naming what it cannot run."""
        raise NotImplementedError

    def read_gguf_config(self, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        """The model's shape from GGUF metadata and tensor shapes (row-major)."""
        raise ValueError(f"the {self.name} family does not read GGUF files")

    def build_model(self, config: ModelConfig, parallel: TensorParallel) -> CausalLM:
        raise NotImplementedError

    def hf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        """An HF checkpoint tensor as the model's: by default the same name, except saved
        rotary frequencies (computed, not loaded) and a tied ``lm_head``'s copy."""
        if name.endswith("rotary_emb.inv_freq"):
            return
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return
        yield name, tensor

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        """A GGUF tensor (dequantized, row-major) as the model's: llama.cpp's standard
        names (:data:`GGUF_GLOBAL_NAMES`, :data:`GGUF_LAYER_NAMES` and the family's
        :meth:`gguf_layer_names`); a name none maps is kept (and reported as unexpected)."""
        if name in GGUF_GLOBAL_NAMES:
            yield GGUF_GLOBAL_NAMES[name], tensor
            return
        match = LAYER_TENSOR.match(name)
        names = self.gguf_layer_names()
        if match is None or match.group(2) not in names:
            yield name, tensor
            return
        layer, module, kind = match.groups()
        yield f"model.layers.{layer}.{names[module]}.{kind}", tensor

    def gguf_layer_names(self) -> Mapping[str, str]:
        """llama.cpp's layer module names as the model's (extend for the family's own)."""
        return GGUF_LAYER_NAMES

    def load_gguf_buffer(self, model: CausalLM, name: str, tensor: torch.Tensor) -> bool:
        """Take a GGUF tensor that is no parameter (Phi-3's LongRoPE factors) into ``model``;
        False: not one of the family's, load it as a parameter (:meth:`gguf_tensors`)."""
        return False

    def check_parallel(self, config: ModelConfig, tensor_parallel_size: int) -> None:
        """Refuse (ValueError) a split this family cannot run, before any weight loads."""
        check_size(tensor_parallel_size, config.num_attention_heads, config.num_key_value_heads)

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def builtin_families() -> list[ModelFamily]:
    """The families lmserve ships, in the order they are tried."""
    from lmserve.backends.torch.models import BUILTIN_FAMILY_MODULES

    return [family for module in BUILTIN_FAMILY_MODULES
            for family in importlib.import_module(f"lmserve.backends.torch.models.{module}").FAMILIES]


def _families(families: Iterable[ModelFamily] | None) -> list[ModelFamily]:
    return list(families) if families else builtin_families()


def supported_hf_architectures(families: Iterable[ModelFamily] | None = None) -> list[str]:
    return [name for family in _families(families) for name in family.hf_architectures]


def family_for_architecture(architecture: str, families: Iterable[ModelFamily] | None = None) -> ModelFamily:
    """The first family claiming the HF architecture name ``architecture`` (a config's
    :attr:`~ModelConfig.architecture`, which GGUF readers set to the HF name too)."""
    for family in _families(families):
        if architecture in family.hf_architectures:
            return family
    raise ValueError(f"unsupported architecture {architecture}; "
                     f"supported: {', '.join(supported_hf_architectures(families))}")


def family_for_hf_config(config: Mapping[str, Any], families: Iterable[ModelFamily] | None = None) -> ModelFamily:
    """The family that runs an HF ``config.json``: by its ``architectures``, else its ``model_type``."""
    families = _families(families)
    names = list(config.get("architectures") or [])
    for name in names:
        for family in families:
            if name in family.hf_architectures:
                return family
    if not names:
        for family in families:
            if config.get("model_type") in family.hf_architectures.values():
                return family
    found = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {found}; supported: {', '.join(supported_hf_architectures(families))}")


def family_for_gguf(fields: Mapping[str, Any], families: Iterable[ModelFamily] | None = None) -> ModelFamily:
    """The first family that claims a GGUF file with metadata ``fields`` (:meth:`ModelFamily.claims_gguf`)."""
    families = _families(families)
    for family in families:
        if family.claims_gguf(fields):
            return family
    supported = dict.fromkeys(name for family in families for name in family.gguf_architectures)
    raise ValueError(f"unsupported GGUF architecture {fields.get('general.architecture')!r}; "
                     f"supported: {', '.join(supported)}")


def read_hf_config(config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None,
                   families: Iterable[ModelFamily] | None = None) -> ModelConfig:
    return family_for_hf_config(config, families).read_hf_config(config, generation_config)


def read_gguf_config(fields: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                     families: Iterable[ModelFamily] | None = None) -> ModelConfig:
    family = family_for_gguf(fields, families)
    return family.read_gguf_config(fields, tensor_shapes)
