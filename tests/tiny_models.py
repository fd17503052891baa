"""Tiny random-weight checkpoints for the fast tests.

Every model here has 2 layers, hidden size 64, 4 query heads and 2 key/value
heads of size 16 (grouped-query attention), so a test builds and runs one in
milliseconds. The weights are random but large enough for attention to be
far from uniform and every bias and norm to matter.

- :func:`write_tiny_hf_model`: an HF directory written by transformers itself.
- :func:`write_tiny_internlm2_model`: the same weights in InternLM2's layout.
- :func:`write_tiny_gguf_model`: the same weights as llama.cpp's converter
  would store them (q/k permuted for the llama architecture).

None of them writes tokenizer files; GGUF tokenizer metadata is optional. The
shape and the random weights are those of :mod:`lmserve.plugins.tiny_model`,
whose Llama (written without transformers) is what ``write_tiny_hf_model``
writes for "llama".
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.plugins.tiny_model import TINY_DIMENSIONS, random_weights

_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def write_tiny_hf_model(directory: str | Path, architecture: str = "llama", *, vocab_size: int = 128,
                        tie_word_embeddings: bool = False, seed: int = 0,
                        **config_overrides: Any) -> Path:
    """Save a tiny random ``architecture`` ("llama", "qwen2" or "mistral")
    model with ``save_pretrained(safe_serialization=True)``; extra keyword
    arguments go to the transformers config class. Returns ``directory``."""
    import transformers

    config_class = getattr(transformers, _CONFIG_CLASSES[architecture])
    options = dict(TINY_DIMENSIONS, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    options.update(config_overrides)
    config = config_class(**options)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _randomize(model: torch.nn.Module, seed: int) -> None:
    parameters = dict(model.named_parameters())
    weights = random_weights(((name, tuple(p.shape)) for name, p in parameters.items()), seed)
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)


def _read_hf_model(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return config, tensors


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters``, or the same built from 4.x's keys."""
    return config.get("rope_parameters") or {
        "rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}


def write_tiny_internlm2_model(directory: str | Path, llama_directory: str | Path | None = None,
                               *, vocab_size: int = 128, seed: int = 0) -> Path:
    """Write ``llama_directory``'s tiny Llama (a fresh one if None) in
    InternLM2's checkpoint layout: its config.json keys and a fused ``wqkv``
    whose rows are grouped per kv head as [queries of the group, key, value]."""
    if llama_directory is None:
        with tempfile.TemporaryDirectory() as scratch:
            llama = write_tiny_hf_model(scratch, "llama", vocab_size=vocab_size, seed=seed)
            return write_tiny_internlm2_model(directory, llama)
    from safetensors.torch import save_file

    llama_config, llama = _read_hf_model(Path(llama_directory))
    heads, kv_heads = llama_config["num_attention_heads"], llama_config["num_key_value_heads"]
    hidden, head_dim = llama_config["hidden_size"], llama_config["head_dim"]
    tensors = {"model.tok_embeddings.weight": llama["model.embed_tokens.weight"],
               "model.norm.weight": llama["model.norm.weight"],
               "output.weight": llama["lm_head.weight"]}
    renames = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
               "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(llama_config["num_hidden_layers"]):
        old, new = f"model.layers.{layer}.", f"model.layers.{layer}."
        q = llama[old + "self_attn.q_proj.weight"].reshape(kv_heads, heads // kv_heads, head_dim, hidden)
        k = llama[old + "self_attn.k_proj.weight"].reshape(kv_heads, 1, head_dim, hidden)
        v = llama[old + "self_attn.v_proj.weight"].reshape(kv_heads, 1, head_dim, hidden)
        tensors[new + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        for old_name, new_name in renames.items():
            tensors[new + new_name + ".weight"] = llama[old + old_name + ".weight"]
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
        "bos_token_id": llama_config.get("bos_token_id"), "eos_token_id": llama_config.get("eos_token_id"),
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": llama_config["intermediate_size"],
        "max_position_embeddings": llama_config["max_position_embeddings"],
        "num_attention_heads": heads, "num_hidden_layers": llama_config["num_hidden_layers"],
        "num_key_value_heads": kv_heads, "pad_token_id": 0, "rms_norm_eps": llama_config["rms_norm_eps"],
        "rope_scaling": None, "rope_theta": _rope_parameters(llama_config)["rope_theta"],
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": llama_config["vocab_size"], "attn_implementation": "eager",
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (``LlamaModel.permute``)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf_model(path: str | Path, source_directory: str | Path | None = None, *,
                          architecture: str = "llama", vocab_size: int = 128,
                          tie_word_embeddings: bool = False, seed: int = 0, tensor_type: str = "F32",
                          tokens: Sequence[str] | None = None, token_types: Sequence[int] | None = None,
                          merges: Sequence[str] | None = None, bos_token_id: int | None = None,
                          eos_token_id: int | None = None, chat_template: str | None = None,
                          tokenizer_model: str = "gpt2") -> Path:
    """Convert a tiny HF model (``source_directory``, or a fresh
    ``architecture`` one) to a GGUF file the way llama.cpp's converter does.

    ``tensor_type`` ("F32", "F16" or "Q8_0") applies to the 2-D weights; norms
    stay F32. Tokenizer metadata is written only for the arguments given.
    """
    import gguf

    if source_directory is None:
        with tempfile.TemporaryDirectory() as scratch:
            source = write_tiny_hf_model(scratch, architecture, vocab_size=vocab_size,
                                         tie_word_embeddings=tie_word_embeddings, seed=seed)
            return write_tiny_gguf_model(
                path, source, tensor_type=tensor_type, tokens=tokens, token_types=token_types,
                merges=merges, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                chat_template=chat_template, tokenizer_model=tokenizer_model)
    config, tensors = _read_hf_model(Path(source_directory))
    arch = "qwen2" if config["model_type"] == "qwen2" else "llama"  # llama.cpp stores Mistral as llama
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, tokenizer_model, tokens, token_types, merges, bos_token_id, eos_token_id,
                   chat_template)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    elif rope_type not in (None, "default"):
        raise ValueError(f"cannot write rope type {rope_type!r} to GGUF")
    for name, tensor in tensors.items():
        gguf_name, array = _to_gguf(name, tensor.float().numpy(), arch, heads, kv_heads)
        if gguf_name is None:
            continue
        if array.ndim == 2 and tensor_type == "F16":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        elif array.ndim == 2 and tensor_type == "Q8_0":
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _add_tokenizer(writer: Any, model: str, tokens, token_types, merges, bos, eos, chat_template) -> None:
    if tokens is not None:
        writer.add_tokenizer_model(model)
        writer.add_token_list(list(tokens))
    if token_types is not None:
        writer.add_token_types(list(token_types))
    if merges is not None:
        writer.add_token_merges(list(merges))
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs``: per frequency, plain inv_freq / llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    theta, head_dim = _rope_parameters(config)["rope_theta"], config["head_dim"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    return (plain / scaled).numpy().astype(np.float32)


def _to_gguf(name: str, array: np.ndarray, arch: str, heads: int,
             kv_heads: int) -> tuple[str | None, np.ndarray]:
    simple = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
    if name in simple:
        return simple[name], array
    if name.endswith("rotary_emb.inv_freq"):
        return None, array
    parts = name.split(".")  # model.layers.N.<module...>.<kind>
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    modules = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
    gguf_module = modules[module]
    if arch == "llama" and gguf_module in ("attn_q", "attn_k"):
        array = permute_qk(array, heads if gguf_module == "attn_q" else kv_heads)
    return f"blk.{layer}.{gguf_module}.{kind}", array
