"""Tokenizer files: a byte-level BPE :class:`~lmserve.core.tokenizer.Tokenizer`
from GGUF metadata or from an HF directory's ``tokenizer.json``.

The loaders of the built-in :hook:`lmserve_load_tokenizer` (``lmserve.plugins.tokenizers``).
They read the vocabulary, merges, added tokens, BOS/EOS, the pre-tokenizer
regex, the normalizer and the chat template out of the model's files; the
tokenizer itself (the BPE on tiktoken) is the kernel's. Only byte-level BPE is
accepted: anything else is refused with a ``ValueError`` naming the file. The
``gguf`` package is imported only when a GGUF file is read.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from lmserve.core.tokenizer import (
    BYTE_LEVEL_ALPHABET,
    GPT2_DIGITS_PATTERN,
    GPT2_PATTERN,
    GPT4O_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    AddedToken,
    Tokenizer,
)

# `tokenizer.ggml.pre` -> regex. Any other value (gpt2, smollm, ...) gets
# GPT-2's regex, as HF transformers does when it loads the same file.
GGUF_PRE_PATTERNS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), LLAMA3_PATTERN),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_PATTERN),
    **dict.fromkeys(("gpt-4o", "llama4"), GPT4O_PATTERN),
}

_GGUF_CONTROL = 3  # llama.cpp token types
_GGUF_USER_DEFINED = 4


def tokenizer_from_path(path: str | Path) -> Tokenizer:
    """Load from a ``.gguf`` file, or from a directory holding ``tokenizer.json`` or one ``.gguf``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_hf_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return tokenizer_from_gguf(ggufs[0])
        raise FileNotFoundError(
            f"{path} has no tokenizer.json and {len(ggufs)} .gguf files; expected one of either."
        )
    raise FileNotFoundError(f"No tokenizer at {path}: expected a .gguf file or a directory.")


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """Load the tokenizer a GGUF file describes in its ``tokenizer.*`` metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported."
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    # Control tokens are special. As in HF transformers, one spelled outside
    # the byte alphabet is a mislabelled ordinary token and is left alone.
    special_ids = {
        i for i, (t, kind) in enumerate(zip(tokens, token_types))
        if kind == _GGUF_CONTROL and BYTE_LEVEL_ALPHABET.issuperset(t)
    }
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        token_id = field(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            special_ids.add(token_id)
    added = [AddedToken(i, tokens[i], special=True) for i in sorted(special_ids)]
    added += [
        AddedToken(i, t, special=False)
        for i, (t, kind) in enumerate(zip(tokens, token_types))
        if kind == _GGUF_USER_DEFINED and i not in special_ids
    ]
    pre = field("tokenizer.ggml.pre", "default")
    return Tokenizer(
        tokens,
        merges,
        added,
        GGUF_PRE_PATTERNS.get(pre, GPT2_PATTERN),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token", False)),
        chat_template=field("tokenizer.chat_template"),
        name=f"lmserve-gguf-{pre}",
    )


def tokenizer_from_hf_dir(path: str | Path) -> Tokenizer:
    """Load from an HF directory's ``tokenizer.json`` and ``tokenizer_config.json``."""
    path = Path(path)
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model is {model.get('type')!r}; only byte-level BPE is supported.")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: BPE with byte_fallback (sentencepiece style) is not supported.")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = [
        AddedToken(
            t["id"], t["content"], bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip"))
        )
        for t in spec.get("added_tokens") or []
    ]
    tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    token_ids = {**vocab, **{t.content: t.id for t in added}}

    bos = _token_content(config.get("bos_token"))
    eos = _token_content(config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos is not None and _post_processor_adds(spec.get("post_processor"), bos)
    return Tokenizer(
        tokens,
        merges,
        added,
        _hf_pattern(spec.get("pre_tokenizer"), path),
        bos_token_id=token_ids.get(bos) if bos is not None else None,
        eos_token_id=token_ids.get(eos) if eos is not None else None,
        add_bos_token=bool(add_bos),
        chat_template=_hf_chat_template(config, path),
        normalizer=_hf_normalizer(spec.get("normalizer"), path),
        name=f"lmserve-hf-{path.name}",
    )


def _token_content(value: object) -> str | None:
    """``bos_token``/``eos_token`` from tokenizer_config: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_adds(processor: dict | None, bos: str) -> bool:
    """Whether a ``TemplateProcessing`` post-processor puts ``bos`` first (Llama 3 style)."""
    if not processor:
        return False
    if processor.get("type") == "Sequence":
        return any(_post_processor_adds(p, bos) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing":
        return False
    single = processor.get("single") or []
    return bool(single) and (single[0].get("SpecialToken") or {}).get("id") == bos


def _hf_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """The tiktoken regex equivalent to an HF byte-level pre-tokenizer."""
    steps = []
    if pre_tokenizer is not None:
        steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if len(byte_level) != 1:
        raise ValueError(f"{path}: expected one ByteLevel pre-tokenizer, found {kinds}.")
    if byte_level[0].get("add_prefix_space"):
        raise ValueError(f"{path}: ByteLevel pre-tokenizer with add_prefix_space is not supported.")
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return GPT2_DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex is not None and split.get("behavior") == "Isolated" and not split.get("invert"):
            return regex
    raise ValueError(f"{path}: unsupported pre-tokenizer {kinds}.")


_NORMALIZER_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


def _hf_normalizer(normalizer: dict | None, path: Path) -> Callable[[str], str] | None:
    """Unicode normalization forms are supported (Qwen2 uses NFC); other normalizers are refused."""
    if normalizer is None:
        return None
    steps = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    forms = [step.get("type") for step in steps]
    if not _NORMALIZER_FORMS.issuperset(forms):
        raise ValueError(f"{path}: unsupported normalizer {forms}.")
    if not forms:
        return None

    def normalize(text: str) -> str:
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text

    return normalize


def _hf_chat_template(config: dict, path: Path) -> str | None:
    """tokenizer_config's ``chat_template`` (a string, or named templates: take "default"),
    else a ``chat_template.jinja`` file beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template
