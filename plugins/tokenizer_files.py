"""Tokenizer files: a :class:`~lmserve.core.tokenizer.Tokenizer` from GGUF metadata
or from an HF directory's ``tokenizer.json``.

The loaders of the built-in :hook:`lmserve_load_tokenizer` (``lmserve.plugins.tokenizers``).
They read the vocabulary, merges (or scores), added tokens, BOS/EOS, the
pre-tokenizer, the normalizer and the chat template out of the model's files;
the tokenizers themselves are the kernel's. Two kinds are accepted: byte-level
BPE (GPT-2 style: ``tokenizer.ggml.model`` "gpt2", a ``ByteLevel``
pre-tokenizer) and SentencePiece-style BPE (``tokenizer.ggml.model`` "llama",
a BPE model with ``byte_fallback`` and ``▁`` for spaces: Llama 2, Mistral,
Mixtral, Phi-3, Gemma); anything else is refused with a ``ValueError`` naming
the file. The ``gguf`` package is imported only when a GGUF file is read.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from lmserve.backends.torch.gguf_file import gguf_reader
from lmserve.core.sentencepiece_bpe import SPACE, SentencePieceTokenizer
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

# llama.cpp token types
_GGUF_NORMAL = 1
_GGUF_CONTROL = 3
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
    reader = gguf_reader(path)

    def field(key: str, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    model = field("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_from_gguf(field)
    if model != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {model!r}; only BPE ('gpt2' byte-level, "
            f"'llama' SentencePiece) is supported."
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
    added = _gguf_added_tokens(field, tokens, token_types, special_ids)
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


def _gguf_added_tokens(field: Callable, tokens: list[str], token_types: list[int],
                       control_ids: set[int]) -> list[AddedToken]:
    """A GGUF vocabulary's added tokens: the control tokens and the BOS/EOS/UNK/PAD ids as
    special ones, user-defined tokens as plain added ones."""
    special_ids = set(control_ids)
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
    return added


def _sentencepiece_from_gguf(field: Callable) -> SentencePieceTokenizer:
    """A ``tokenizer.ggml.model == "llama"`` vocabulary, tokenized as llama.cpp does:
    merges by token score, a space in front of the text at the start and after
    every added token unless ``add_space_prefix`` is false (Gemma), BOS added
    unless ``add_bos_token`` is false."""
    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type", [_GGUF_NORMAL] * len(tokens))
    scores: list[float] = field("tokenizer.ggml.scores", [0.0] * len(tokens))
    added = _gguf_added_tokens(field, tokens, token_types,
                               {i for i, kind in enumerate(token_types) if kind == _GGUF_CONTROL})
    special_ids = {token.id for token in added if token.special}
    mergeable = {
        i: score for i, (kind, score) in enumerate(zip(token_types, scores))
        if kind in (_GGUF_NORMAL, _GGUF_USER_DEFINED) and i not in special_ids
    }
    space_prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    return SentencePieceTokenizer(
        tokens,
        added,
        scores=mergeable,
        space_prefix="always" if space_prefix else "never",
        prefix_spaced_text=True,
        leading_space_decoding="strip" if space_prefix else "keep",
        unk_token_id=field("tokenizer.ggml.unknown_token_id"),
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token", True)),
        chat_template=field("tokenizer.chat_template"),
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
    if _is_sentencepiece_style(spec):
        return SentencePieceTokenizer(
            tokens,
            added,
            merges=merges,
            unk_token_id=token_ids.get(model["unk_token"]) if model.get("unk_token") else None,
            byte_fallback=bool(model.get("byte_fallback")),
            fuse_unk=bool(model.get("fuse_unk")),
            ignore_merges=bool(model.get("ignore_merges")),
            bos_token_id=token_ids.get(bos) if bos is not None else None,
            eos_token_id=token_ids.get(eos) if eos is not None else None,
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(config, path),
            **_hf_sentencepiece_options(spec, path),
        )
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


def _steps(component: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer / decoder, a ``Sequence`` or one alone."""
    if component is None:
        return []
    return list(component.get(key) or []) if component.get("type") == "Sequence" else [component]


def _is_sentencepiece_style(spec: dict) -> bool:
    """A BPE model with byte fallback, or one whose spaces are written as ``▁``."""
    if (spec.get("model") or {}).get("byte_fallback"):
        return True
    steps = _steps(spec.get("normalizer"), "normalizers") + _steps(spec.get("pre_tokenizer"), "pretokenizers")
    return any(step.get("type") == "Metaspace" or _replaces_spaces(step) for step in steps)


def _replaces_spaces(step: dict) -> bool:
    return (step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == " "
            and step.get("content") == SPACE)


def _hf_sentencepiece_options(spec: dict, path: Path) -> dict:
    """The :class:`SentencePieceTokenizer` options a ``tokenizer.json``'s normalizer,
    pre-tokenizer and decoder amount to (HF's conversions of sentencepiece models:
    Gemma's ``Replace(" ", "▁")``; Llama 2's ``Prepend("▁")`` + ``Replace``; newer
    ones' ``Metaspace`` pre-tokenizer with a ``prepend_scheme``)."""
    model = spec.get("model") or {}
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: BPE with subword prefixes or suffixes is not supported.")
    options: dict = {"space_prefix": "never", "prefix_spaced_text": True, "split_at_spaces": False}
    forms, spaced = [], False
    for step in _steps(spec.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind in _NORMALIZER_FORMS and not spaced:
            forms.append(kind)
        elif _replaces_spaces(step):
            spaced = True
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            options.update(space_prefix="always", prefix_spaced_text=True)
        else:
            raise ValueError(f"{path}: unsupported normalizer step {kind!r} in a SentencePiece-style tokenizer.")
    for step in _steps(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement", SPACE) == SPACE:
            spaced = True
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            options.update(space_prefix=scheme, prefix_spaced_text=False, split_at_spaces=bool(step.get("split", True)))
        elif kind == "Split" and spaced and (step.get("pattern") or {}).get("String") == " ":
            continue  # Gemma's: cuts at spaces, none of which is left after the normalizer
        else:
            raise ValueError(f"{path}: unsupported pre-tokenizer step {kind!r} in a SentencePiece-style tokenizer.")
    if not spaced:
        raise ValueError(f"{path}: a byte-fallback BPE whose spaces are not written as {SPACE!r} is not supported.")
    options["normalizer"] = _unicode_normalizer(forms)
    options["leading_space_decoding"] = _hf_leading_space_decoding(spec.get("decoder"), path)
    return options


def _hf_leading_space_decoding(decoder: dict | None, path: Path) -> str:
    """How the decoder treats a text's first token: ``Strip(" ", 1, 0)`` strips a space,
    a ``Metaspace`` decoder that prepends drops the first token's ``▁``."""
    decoding = "keep"
    for step in _steps(decoder, "decoders"):
        kind = step.get("type")
        if kind == "Strip":
            if (step.get("content"), step.get("start"), step.get("stop")) != (" ", 1, 0):
                raise ValueError(f"{path}: unsupported decoder step {step}.")
            decoding = "strip"
        elif kind == "Metaspace":
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            decoding = "keep" if scheme == "never" else "drop_spaces"
        elif kind == "Replace" and (step.get("pattern") or {}).get("String") == SPACE and step.get("content") == " ":
            continue
        elif kind not in ("ByteFallback", "Fuse"):
            raise ValueError(f"{path}: unsupported decoder step {kind!r} in a SentencePiece-style tokenizer.")
    return decoding


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
    forms = [step.get("type") for step in _steps(normalizer, "normalizers")]
    if not _NORMALIZER_FORMS.issuperset(forms):
        raise ValueError(f"{path}: unsupported normalizer {forms}.")
    return _unicode_normalizer(forms)


def _unicode_normalizer(forms: list[str]) -> Callable[[str], str] | None:
    """The Unicode normalization ``forms``, one after the other (``None`` for none)."""
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
