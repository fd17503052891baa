"""A tiny byte-level BPE tokenizer, written as an HF directory, for tests.

``write_tiny_tokenizer(directory)`` writes ``tokenizer.json`` and
``tokenizer_config.json`` that both lmserve and HF transformers load: the 256
byte tokens (id == byte value), merges learnt from a short English and Python
sample, and ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as special
tokens. Deterministic: the same files every time.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

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


def _byte_spelling() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    spelling = _byte_spelling()
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
    spelling = _byte_spelling()
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
