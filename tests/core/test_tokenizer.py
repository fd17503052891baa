"""The tiktoken-based tokenizer against HF tokenizers, id for id.

The tokenizers are read from files by the built-in loaders
(``lmserve.plugins.tokenizer_files``), whose reading is tested here too.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmserve.core.tokenizer import (
    GPT2_PATTERN,
    GPT4O_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    Tokenizer,
    bytes_to_spelled,
    spelled_to_bytes,
)
from lmserve.plugins.tokenizer_files import tokenizer_from_gguf, tokenizer_from_hf_dir, tokenizer_from_path
from tiny_tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, tokenizer_config, write_tiny_tokenizer

import transformers  # noqa: E402  (the reference; a dev dependency)

HAND_WRITTEN = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Then the dog went to sleep.",
    "I'm sure they'll say we've done what you'd expect; it's THE END'S start. DON'T 'S 'll",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Foo(Bar):\n\tdef __init__(self, *args, **kwargs):\n\t\tsuper().__init__(*args, **kwargs)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C code\n",
    "x = {'a': [1, 2, 3], \"b\": (4.5e-3, -6), 'c': None}  # dict literal",
    "机器学习是人工智能的一个分支。我们今天去公园散步吧！",
    "日本語のテキストです。カタカナとひらがな、そして漢字。",
    "한국어 텍스트입니다. 안녕하세요, 만나서 반갑습니다!",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵🇫🇷 ❤️ 🧑🏿‍🚀",
    "Flags alone: 🇩🇪🇬🇧🇨🇳🇰🇷🇧🇷",
    "    four spaces, then\ttab\t\ttabs\n\n\nnewlines\r\n  \t \n mixed   ",
    "                                                                trailing",
    "\n\n\n\n\n\n\n\n\n\n",
    "\t\t\t\t\t\t\t\t",
    "    ",
    " ",
    "",
    "3.14159265358979323846 and 1234567890 and 1,000,000 and 0x1F and ٣٤٥ and ²³",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|><|im_end|>  <|im_start|> spaced <|im_start",
    "Café naïve façade résumé coöperate Ångström Ærø São Paulo Zürich señor",
    "Combining: e\u0301 a\u0308 n\u0303 and precomposed: é ä ñ",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी, ไทย",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1 ⇒ √(x² + y²) ≤ 1; ∑ ∫ ∂ ∞ ≠ ≈",
    "Whitespace zoo:\u00a0nbsp\u3000ideographic\u2028line\u2029para\u0085nel\u200bzwsp\ufeffbom\u2003em",
    "Controls: \x00\x01\x04\x06\x13\x14\x16\x1d\x1b[31mred\x1b[0m\x7f",
    "Rare planes: \U00020000\U0002a6d6\U00040000\U000e0001\U0010fffd",
    "URL https://example.com/path?query=a&b=c#frag and email a.b@example.org",
    "Repeated: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!!!!??????......",
    "    return x  \n\n    \n\t\n",
    "It's ok. It'S ok. IT'S ok. it’s curly.",
    "end with spaces   ",
    "line1\nline2\n\nline3   \n   line4",
]

_WORDS = "the of and to in is was for that with as on by at from his her they we you it this be".split()
_FRAGMENTS = [
    "Hello", "world", "function", "return", "print(", ")", "[]", "{}", "==", "!=", "->", "::", "...",
    "机器", "学习", "こんにちは", "世界", "안녕", "😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "🏳️‍🌈", "é", "ñ", "ü",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "12", "345", "6789", "0", "3.5", "1e10",
    "don't", "we'll", "I'M", "’", "\"", "'", "#", "@", "%", "&&", "||", "Ω", "µ", "ß", "\u00a0",
]
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\t\n ", "\r\n", "        ", "\n    ", ""]


def generated_lines(count: int = 240, seed: int = 1234) -> list[str]:
    """Random mixes of words, code, CJK, emoji, digits, special tokens and whitespace runs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 14)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(_WORDS))
            elif kind < 0.7:
                parts.append(rng.choice(_FRAGMENTS))
            elif kind < 0.8:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            elif kind < 0.9:
                parts.append(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1FAFF),
                                             rng.randint(0xAC00, 0xD7A3), rng.randint(0x00C0, 0x024F)])))
            parts.append(rng.choice(_SPACES) if rng.random() < 0.6 else "")
        lines.append("".join(parts))
    return lines


CORPUS = HAND_WRITTEN + generated_lines()


def has_every_byte(tokenizer: Tokenizer, text: str) -> bool:
    """Whether each byte of ``text`` has a token (SmolLM2 lacks a few, such as 0x04; BPE drops them)."""
    return all(tokenizer.token_to_id(bytes_to_spelled(bytes((b,)))) is not None for b in set(text.encode()))


def assert_same_as_hf(tokenizer: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False)
        got = tokenizer.encode(text, add_bos=False)
        assert got == expected, f"{text!r}: {got} != {expected}"
        if has_every_byte(tokenizer, text):
            assert tokenizer.decode(got) == text, repr(text)


def load_hf(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    assert write_tiny_tokenizer(directory) == VOCAB_SIZE
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return tokenizer_from_path(tiny_dir)


def test_corpus_is_mixed():
    assert len(CORPUS) >= 250
    joined = "".join(CORPUS)
    for needle in ("<|im_start|>", "👨‍👩‍👧", "🇯🇵", "机器", "한국어", "\t\t", "  \n", "é"):
        assert needle in joined


def test_tiny_matches_hf(tiny, tiny_dir):
    hf = load_hf(tiny_dir)
    assert tiny.vocab_size == VOCAB_SIZE == len(hf)
    assert (tiny.bos_token, tiny.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert (tiny.bos_token_id, tiny.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tiny.add_bos_token is False
    assert "<|im_start|>" in tiny.chat_template
    assert_same_as_hf(tiny, hf, CORPUS)
    assert [tiny.id_to_token(i) for i in range(tiny.vocab_size)] == hf.convert_ids_to_tokens(list(range(len(hf))))


def test_tiny_api(tiny):
    ids = tiny.encode("the <|im_end|>")
    assert tiny.special_token_ids == {tiny.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids[-1] == tiny.eos_token_id and tiny.is_special(ids[-1]) and not tiny.is_special(ids[0])
    assert tiny.decode(ids, skip_special_tokens=True) == "the "
    assert tiny.token_bytes(tiny.token_to_id("Ġthe")) == b" the"
    assert tiny.token_bytes(tiny.eos_token_id) == b"<|im_end|>"
    assert tiny.token_to_id("no such token") is None
    assert tiny.encode("hi", add_bos=True)[0] == tiny.bos_token_id
    assert tiny.encode("hi") == tiny.encode("hi", add_bos=False)
    assert tiny.decode([tiny.vocab_size + 5, *tiny.encode("ok")]) == "ok"  # padded-vocab ids decode to nothing
    assert tiny.decode(tiny.encode("\u4f60")[:2]) == "\ufffd"
    assert spelled_to_bytes(bytes_to_spelled(bytes(range(256)))) == bytes(range(256))


def _rewrite(tiny_dir: Path, out: Path, edit) -> Path:
    """A copy of the tiny tokenizer with ``edit(tokenizer_json_dict)`` applied."""
    out.mkdir()
    spec = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text((tiny_dir / "tokenizer_config.json").read_text())
    return out


def test_ids_not_in_merge_order(tiny_dir, tmp_path):
    """Ids shuffled so merges no longer produce increasing ids: ranks must be translated."""

    def shuffle(spec):
        vocab = spec["model"]["vocab"]
        ids = sorted(vocab.values())
        shuffled = ids[:]
        random.Random(7).shuffle(shuffled)
        remap = dict(zip(ids, shuffled))
        spec["model"]["vocab"] = {token: remap[i] for token, i in vocab.items()}
        for token in spec["added_tokens"]:
            token["id"] = remap[token["id"]]
        merged = [spec["model"]["vocab"][m.replace(" ", "")] for m in spec["model"]["merges"]]
        assert merged != sorted(merged)

    directory = _rewrite(tiny_dir, tmp_path / "shuffled", shuffle)
    tokenizer = tokenizer_from_hf_dir(directory)
    assert tokenizer._identity_limit == -1  # the translated path is the one under test
    assert_same_as_hf(tokenizer, load_hf(directory), CORPUS)


def test_unreachable_and_plain_added_tokens(tiny_dir, tmp_path):
    """A vocab token no merge makes is never produced; a non-special added token is matched whole."""

    def edit(spec):
        vocab = spec["model"]["vocab"]
        vocab["Ġquickly"] = len(vocab)
        vocab["ĠĠĠ"] = len(vocab)  # reachable only through a merge that does not exist
        spec["added_tokens"].append(
            {"id": len(vocab), "content": "<tool>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": False}
        )
        vocab["<tool>"] = len(vocab)

    directory = _rewrite(tiny_dir, tmp_path / "unreachable", edit)
    tokenizer = tokenizer_from_hf_dir(directory)
    hf = load_hf(directory)
    texts = ["run quickly", " quickly", "a<tool>b <tool> x", "     five", *CORPUS[:60]]
    assert_same_as_hf(tokenizer, hf, texts)
    tool = tokenizer.token_to_id("<tool>")
    assert tool in tokenizer.encode("a<tool>b") and not tokenizer.is_special(tool)
    assert tokenizer.decode([tokenizer.token_to_id("Ġquickly")]) == " quickly"


@pytest.mark.parametrize(
    "pre_tokenizer",
    [
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    ],
    ids=["llama3-split", "qwen2-split", "digits-bytelevel"],
)
def test_pre_tokenizers(tiny_dir, tmp_path, pre_tokenizer):
    def edit(spec):
        spec["pre_tokenizer"] = pre_tokenizer
        # Digit merges make splitting digits matter.
        vocab = spec["model"]["vocab"]
        for a, b in [("1", "2"), ("Ġ", "1"), ("12", "3"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ")]:
            if a + b not in vocab:
                vocab[a + b] = max(max(vocab.values()), *(t["id"] for t in spec["added_tokens"])) + 1
                spec["model"]["merges"].append(f"{a} {b}")

    directory = _rewrite(tiny_dir, tmp_path / "pre", edit)
    texts = [*CORPUS, "123 1234 12 3 x123y  1 \n 12\n\n 1", "  1", " \t 12", "a  \n\n  1"]
    assert_same_as_hf(tokenizer_from_hf_dir(directory), load_hf(directory), texts)


def test_hf_config_variants(tiny_dir, tmp_path):
    directory = _rewrite(tiny_dir, tmp_path / "variants", lambda spec: None)
    config = tokenizer_config(bos_token="<|im_start|>", eos_token="<|im_end|>")
    config["bos_token"] = {"content": "<|im_start|>", "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config["add_bos_token"] = True
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = tokenizer_from_path(directory)
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.chat_template == "D"
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id

    del config["chat_template"], config["add_bos_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text("J")
    tokenizer = tokenizer_from_path(directory)
    assert tokenizer.chat_template == "J" and tokenizer.add_bos_token is False


def test_refuses_what_it_cannot_do(tiny_dir, tmp_path):
    def not_bpe(spec):
        spec["model"]["type"] = "Unigram"

    with pytest.raises(ValueError, match="Unigram"):
        tokenizer_from_hf_dir(_rewrite(tiny_dir, tmp_path / "unigram", not_bpe))
    with pytest.raises(FileNotFoundError):
        tokenizer_from_path(tmp_path / "missing")


def _write_gguf(path: Path, tiny_dir: Path, model: str = "gpt2", pre: str = "gpt2") -> Path:
    """The tiny tokenizer as llama.cpp would store it in a GGUF file (no tensors)."""
    import gguf
    spec = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(spec["model"]["merges"])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template("CHAT")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_metadata(tiny_dir, tiny, tmp_path):
    tokenizer = tokenizer_from_path(_write_gguf(tmp_path / "tiny.gguf", tiny_dir))
    assert tokenizer.vocab_size == tiny.vocab_size
    assert tokenizer.special_token_ids == tiny.special_token_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template) == ("<|im_start|>", "<|im_end|>", "CHAT")
    assert tokenizer.pattern == GPT2_PATTERN
    for text in CORPUS:
        assert tokenizer.encode(text) == tiny.encode(text)

    llama3 = tokenizer_from_gguf(_write_gguf(tmp_path / "llama3.gguf", tiny_dir, pre="llama-bpe"))
    assert llama3.pattern == LLAMA3_PATTERN
    qwen2 = tokenizer_from_gguf(_write_gguf(tmp_path / "qwen2.gguf", tiny_dir, pre="qwen2"))
    assert qwen2.pattern == QWEN2_PATTERN
    gpt4o = tokenizer_from_gguf(_write_gguf(tmp_path / "gpt4o.gguf", tiny_dir, pre="gpt-4o"))
    assert gpt4o.pattern == GPT4O_PATTERN and gpt4o.encode("Hello World's") == tiny.encode("Hello World's")
    with pytest.raises(ValueError, match="'bert'"):  # SentencePiece's 'llama': test_sentencepiece_tokenizer.py
        tokenizer_from_gguf(_write_gguf(tmp_path / "wordpiece.gguf", tiny_dir, model="bert"))


def test_import_stays_light():
    code = "import lmserve.core.tokenizer, lmserve.core.detokenizer, sys; " \
           "assert 'torch' not in sys.modules and 'sanic' not in sys.modules and 'gguf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real model ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


@pytest.mark.real_model
def test_smollm2_matches_hf(smollm2, smollm2_hf):
    assert smollm2.vocab_size == 49152 == len(smollm2_hf)
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (1, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.add_bos_token is False
    assert "<|im_start|>" in smollm2.chat_template
    assert smollm2.special_token_ids == set(range(17))
    assert smollm2._identity_limit == smollm2.vocab_size  # rank == id: tiktoken's output is used as is
    assert_same_as_hf(smollm2, smollm2_hf, CORPUS)
    assert smollm2.encode("\x04") == smollm2_hf.encode("\x04", add_special_tokens=False) == []


@pytest.mark.real_model
def test_smollm2_token_strings(smollm2, smollm2_hf):
    ids = list(range(smollm2.vocab_size))
    assert [smollm2.id_to_token(i) for i in ids] == smollm2_hf.convert_ids_to_tokens(ids)
    assert smollm2.token_to_id("Ġthe") == smollm2_hf.convert_tokens_to_ids("Ġthe")


@pytest.mark.real_model
def test_smollm2_long_text_is_fast(smollm2, smollm2_hf):
    text = "\n".join(t for t in CORPUS if has_every_byte(smollm2, t)) * 20  # ~0.3 MB, special tokens included
    start = time.perf_counter()
    ids = smollm2.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == smollm2_hf.encode(text, add_special_tokens=False)
    assert smollm2.decode(ids) == text
    assert elapsed < 2.0, f"encoding {len(text)} characters took {elapsed:.2f}s"
