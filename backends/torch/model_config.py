"""The shape of a model, read from config.json or GGUF metadata.

A frozen :class:`ModelConfig` holds what the engine needs of every model (its
layers, heads, vocabulary, how each layer attends) and what the dense families
share; a family whose models need more subclasses it
(:mod:`~lmserve.backends.torch.models`). Each family's reader validates what it
reads and refuses, by name, what its model cannot run, rather than load a model
that would give wrong logits. The readers' shared parts are here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("linear", "dynamic", "llama3")  # None means plain RoPE
LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one llama-family decoder.

    ``rope_scaling`` is None for plain RoPE, else a dict with ``rope_type`` in
    :data:`ROPE_TYPES` and that type's keys (HF's spelling). ``attention_bias``
    puts a bias on q/k/v (Qwen2), ``attention_output_bias`` one on o_proj
    (Llama with ``attention_bias``, InternLM2 with ``bias``).
    ``sliding_window`` limits each query to that many most recent keys (Mistral).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_output_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    #: Per layer, HF's ``layer_types`` (``"sliding_attention"`` or ``"full_attention"``);
    #: None: every layer slides when ``sliding_window`` is set (Mistral).
    layer_types: tuple[str, ...] | None = None
    #: Attention scores are ``q . k * attention_scale``; None: ``head_dim ** -0.5``.
    attention_scale: float | None = None
    #: Gemma 2: attention scores and final logits pass through ``cap * tanh(x / cap)``.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        _check_rope_scaling(self.rope_scaling)
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(f"layer_types {sorted(unknown)} are not supported; supported: {', '.join(LAYER_TYPES)}")
        for name in ("attention_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")

    def layer_window(self, layer_idx: int) -> int:
        """How many latest positions layer ``layer_idx`` attends to (0: all of them)."""
        if self.sliding_window is None:
            return 0
        if self.layer_types is None or self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return 0

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Read an HF ``config.json`` dict (and optionally ``generation_config.json``) with
        the built-in family that claims its architecture."""
        from lmserve.backends.torch.models.family import read_hf_config

        return read_hf_config(config, generation_config)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        """Read GGUF metadata (key -> plain Python value) and the file's tensor shapes
        (name -> shape in row-major order) with the built-in family of its architecture."""
        from lmserve.backends.torch.models.family import read_gguf_config

        return read_gguf_config(fields, tensor_shapes)


class HFConfigReader:
    """Reads an HF ``config.json`` for one architecture: ``reader("key", default)``, a
    missing key without a default (or null) is a ValueError naming it."""

    def __init__(self, config: Mapping[str, Any], architecture: str):
        self.config, self.architecture = config, architecture

    def __call__(self, key: str, default: Any = ...) -> Any:
        if key in self.config and self.config[key] is not None:
            return self.config[key]
        if default is ...:
            raise ValueError(f"config.json for {self.architecture} lacks {key!r}")
        return default


def common_hf_fields(config: Mapping[str, Any], generation_config: Mapping[str, Any] | None,
                     architecture: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every family reads the same way from an HF
    ``config.json`` (``generation_config.json``'s ``eos_token_id`` list adds end tokens,
    e.g. Llama 3's ``<|eot_id|>``); a family adds or overrides the rest."""
    get = HFConfigReader(config, architecture)
    hidden_size, num_heads = get("hidden_size"), get("num_attention_heads")
    rope_theta, rope_scaling = hf_rope(config)
    eos = as_ids(config.get("eos_token_id"))
    if generation_config is not None:
        eos += tuple(i for i in as_ids(generation_config.get("eos_token_id")) if i not in eos)
    return dict(
        architecture=architecture,
        vocab_size=get("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("num_key_value_heads", num_heads),
        head_dim=get("head_dim", hidden_size // num_heads),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos,
    )


class GGUFFieldReader:
    """Reads ``<arch>.<key>`` GGUF metadata: ``reader("key", default)``; a missing key
    without a default is a ValueError naming it."""

    def __init__(self, fields: Mapping[str, Any], arch: str):
        self.fields, self.arch = fields, arch

    def __call__(self, key: str, default: Any = ...) -> Any:
        value = self.fields.get(f"{self.arch}.{key}", default)
        if value is ...:
            raise ValueError(f"GGUF metadata lacks {self.arch}.{key}")
        return value


def common_gguf_fields(fields: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                       architecture: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every family reads the same way from GGUF metadata
    (``architecture``: the HF name the file's model goes by). Biases and tied embeddings
    are read off the tensors."""
    arch = fields.get("general.architecture")
    get = GGUFFieldReader(fields, arch)
    hidden_size, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden_size // num_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"partial rotary embeddings ({arch}.rope.dimension_count="
                         f"{get('rope.dimension_count')}, head_dim={head_dim}) are not supported")
    if "token_embd.weight" in tensor_shapes:
        vocab_size = tensor_shapes["token_embd.weight"][0]
    else:
        vocab_size = get("vocab_size", len(fields.get("tokenizer.ggml.tokens", ())))
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = fields.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    return dict(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=gguf_rope_scaling(arch, fields),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        attention_output_bias="blk.0.attn_output.bias" in tensor_shapes,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(eos),
    )


def hf_rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers 5's ``rope_parameters``
    or the older ``rope_theta`` + ``rope_scaling`` pair."""
    params = config.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    rope_type, legacy_type = scaling.pop("rope_type", None), scaling.pop("type", None)
    rope_type = rope_type or legacy_type
    if rope_type in (None, "default"):
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **scaling}


def gguf_rope_scaling(arch: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    rope_type = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor")
    if rope_type is None and fields.get(f"{arch}.rope.scale_linear") is not None:
        rope_type, factor = "linear", fields[f"{arch}.rope.scale_linear"]
    if rope_type in (None, "none") or (rope_type == "linear" and factor == 1.0):
        return None
    if rope_type != "linear":
        raise ValueError(f"GGUF rope scaling type {rope_type!r} is not supported")
    return {"rope_type": "linear", "factor": float(factor)}


def _check_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> None:
    if rope_scaling is None:
        return
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                         f"supported: default, {', '.join(ROPE_TYPES)}")
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if rope_scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    if not rope_scaling["factor"] > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {rope_scaling['factor']}")


def as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
