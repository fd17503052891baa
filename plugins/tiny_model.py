"""A tiny random Llama with a tiny byte-level BPE tokenizer, written on the fly.

Tests of lmserve and of its plugins need a model that loads and generates in
well under a second and needs no download. :func:`write_tiny_model` writes one
in the Hugging Face layout both lmserve and HF transformers load: 2 layers,
hidden size 64, 4 query heads and 2 key/value heads of size 16 (grouped-query
attention), seeded random weights large enough for attention to be far from
uniform, and the tokenizer of :func:`write_tiny_tokenizer`.

:func:`write_tiny_tokenizer` writes ``tokenizer.json`` and
``tokenizer_config.json``: the 256 byte tokens (id == byte value), merges learnt
from a short English and Python sample, and ``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>`` as special tokens, with a ChatML template.

Everything here is deterministic (the same files every time) and needs only
lmserve's own dependencies: plugin authors get it without transformers.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Iterable

from lmserve.core.tokenizer import bytes_to_unicode

NUM_MERGES = 64
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 256 + NUM_MERGES + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SAMPLE = """\
The quick brown fox jumps over the lazy dog. Then the dog went to sleep in the sun,
and the fox ran into the forest with the other animals. There is nothing that they
could not do together, and they were happy with their lives in the green hills.
This is the story of the fox and the dog, and of the things that they learnt.
def the_function(value):
    return value + 1

for item in range(10):
    print(the_function(item))
"""

# GPT-2's pre-tokenizer, approximated with Python's re: only used to learn merges.
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    spelling = bytes_to_unicode()
    words = collections.Counter(
        tuple(spelling[b] for b in word.encode("utf-8")) for word in _WORDS.findall(text)
    )
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def tokenizer_json(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: list[tuple[int, str]],
    pre_tokenizer: dict | None = None,
) -> dict:
    """An HF ``tokenizer.json`` document for a byte-level BPE vocabulary."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token_id, content in added
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer or byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def tokenizer_config(bos_token: str, eos_token: str, chat_template: str = CHATML_TEMPLATE) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": chat_template,
    }


def write_tiny_tokenizer(directory: Path) -> int:
    """Write the tiny tokenizer's ``tokenizer.json`` and ``tokenizer_config.json``; return its vocab size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spelling = bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    merges = learn_merges(_SAMPLE, NUM_MERGES)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = [(len(vocab) + k, token) for k, token in enumerate(SPECIAL_TOKENS)]
    for token_id, token in added:
        vocab[token] = token_id
    (directory / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(vocab, merges, added), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    config = tokenizer_config(bos_token="<|endoftext|>", eos_token="<|im_end|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    assert len(vocab) == VOCAB_SIZE
    return len(vocab)


# ------------------------------------------------------------------------------- model

#: The tiny model's shape, shared by every architecture lmserve's tests write.
TINY_DIMENSIONS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def random_weights(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict:
    """Seeded random tensors by name, drawn in the order of ``shapes`` (a
    model's ``named_parameters`` order): norms near 1, biases of scale 0.5,
    unit-scale embeddings, and projections scaled for unit-scale outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes:
        noise = torch.randn(shape, generator=generator)
        if "norm" in name:
            weights[name] = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            weights[name] = 0.5 * noise
        elif "embed_tokens" in name:
            weights[name] = noise
        else:  # a projection: unit-scale outputs for unit-scale inputs
            weights[name] = noise / shape[1] ** 0.5
    return weights


#: SmolLM2-135M's shape: a random model of it (``dimensions=SMOLLM2_135M_DIMENSIONS``)
#: measures speed where the real weights cannot go.
SMOLLM2_135M_DIMENSIONS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                               vocab_size=49152)


def _llama_parameter_shapes(vocab_size: int, dimensions: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of transformers' ``LlamaForCausalLM`` in its registration
    order, so :func:`random_weights` draws the same values transformers' model
    would get."""
    hidden, intermediate = dimensions["hidden_size"], dimensions["intermediate_size"]
    head_dim = hidden // dimensions["num_attention_heads"]
    kv_width = dimensions["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (vocab_size, hidden))]
    for layer in range(dimensions["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes += [(prefix + "self_attn.q_proj.weight", (hidden, hidden)),
                   (prefix + "self_attn.k_proj.weight", (kv_width, hidden)),
                   (prefix + "self_attn.v_proj.weight", (kv_width, hidden)),
                   (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
                   (prefix + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (prefix + "mlp.up_proj.weight", (intermediate, hidden)),
                   (prefix + "mlp.down_proj.weight", (hidden, intermediate)),
                   (prefix + "input_layernorm.weight", (hidden,)),
                   (prefix + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab_size, hidden))]
    return shapes


def write_tiny_model(directory: str | Path, *, max_position_embeddings: int | None = None, seed: int = 0,
                     dimensions: dict | None = None) -> Path:
    """Write the tiny Llama and its tokenizer to ``directory`` (created if
    missing): ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
    ``tokenizer_config.json``. BOS is ``<|endoftext|>``, EOS ``<|im_end|>``.
    ``dimensions`` replaces :data:`TINY_DIMENSIONS` (a ``vocab_size`` in it
    pads the vocabulary past the tokenizer's); ``max_position_embeddings``
    replaces theirs. Returns ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    vocab_size = write_tiny_tokenizer(directory)
    dimensions = dict(dimensions or TINY_DIMENSIONS)
    model_vocab_size = max(vocab_size, dimensions.pop("vocab_size", 0))
    if max_position_embeddings is not None:
        dimensions["max_position_embeddings"] = max_position_embeddings
    heads = dimensions["num_attention_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        **dimensions, "head_dim": dimensions["hidden_size"] // heads, "vocab_size": model_vocab_size,
        "hidden_act": "silu", "rms_norm_eps": 1e-05, "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False, "dtype": "float32",
        "bos_token_id": vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|endoftext|>"),
        "eos_token_id": vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_end|>"),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = random_weights(_llama_parameter_shapes(model_vocab_size, dimensions), seed)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
