"""The shape of a llama-family model, read from config.json or GGUF metadata.

One frozen :class:`ModelConfig` describes every architecture the torch engine
runs (Llama 2/3, Mistral, Qwen2, InternLM2, SmolLM): they differ only in the
fields below. Both readers validate what they read and refuse, by name, what
the model class cannot run, rather than load a model that would give wrong
logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# HF ``architectures`` entries this engine runs, keyed by config.json ``model_type``.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
# GGUF ``general.architecture`` values this engine runs, mapped to the HF name.
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
ROPE_TYPES = ("linear", "dynamic", "llama3")  # None means plain RoPE
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

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any],
                       generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Read an HF ``config.json`` dict (and optionally ``generation_config.json``,
        whose ``eos_token_id`` list adds end tokens, e.g. Llama 3's ``<|eot_id|>``)."""
        architecture = _hf_architecture(config)

        def get(key: str, default: Any = ...) -> Any:
            if key in config and config[key] is not None:
                return config[key]
            if default is ...:
                raise ValueError(f"config.json for {architecture} lacks {key!r}")
            return default

        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
        if get("mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        hidden_size, num_heads = get("hidden_size"), get("num_attention_heads")
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
        rope_theta, rope_scaling = _hf_rope(config)
        eos = _as_ids(config.get("eos_token_id"))
        if generation_config is not None:
            eos += tuple(i for i in _as_ids(generation_config.get("eos_token_id")) if i not in eos)
        return cls(
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
            attention_bias=qkv_bias,
            attention_output_bias=out_bias,
            sliding_window=sliding_window,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any],
                         tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
        """Read GGUF metadata (key -> plain Python value) and the file's tensor
        shapes (name -> shape in row-major order, e.g. ``token_embd.weight`` ->
        ``(vocab, hidden)``). Biases and tied embeddings are read off the tensors."""
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}; "
                             f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

        def get(key: str, default: Any = ...) -> Any:
            value = fields.get(f"{arch}.{key}", default)
            if value is ...:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

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
        return cls(
            architecture=SUPPORTED_GGUF_ARCHITECTURES[arch],
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"),
            num_attention_heads=num_heads,
            num_key_value_heads=get("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(arch, fields),
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            attention_output_bias="blk.0.attn_output.bias" in tensor_shapes,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(eos),
        )


def _hf_architecture(config: Mapping[str, Any]) -> str:
    names = list(config.get("architectures") or [])
    if not names and config.get("model_type") in SUPPORTED_ARCHITECTURES:
        names = [SUPPORTED_ARCHITECTURES[config["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES.values():
            return name
    found = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {found}; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES.values())}")


def _hf_rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
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


def _gguf_rope_scaling(arch: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
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


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
