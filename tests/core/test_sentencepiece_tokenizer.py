"""SentencePiece-style BPE (Llama 2, Mistral, Mixtral, Phi-3, Gemma) against its references.

Small sentencepiece BPE models are trained here with byte fallback, Llama-style
(dummy prefix) and Gemma-style (none; one variant with pieces that span words),
and converted by transformers to ``tokenizer.json``. Ours must give HF
``tokenizers``' ids and text for ``tokenizer.json``, and, for the GGUF file that
llama.cpp's own converter writes, sentencepiece's ids and text (llama.cpp's SPM
tokenizer reproduces sentencepiece; it puts the dummy prefix after every added
token too).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lmserve.core.detokenizer import IncrementalDetokenizer
from lmserve.core.sentencepiece_bpe import SentencePieceTokenizer, byte_token_value, piece_bytes
from lmserve.core.tokenizer import AddedToken
from lmserve.plugins.tokenizer_files import tokenizer_from_gguf, tokenizer_from_hf_dir, tokenizer_from_path
from test_tokenizer import CORPUS

import sentencepiece  # noqa: E402  (the references; dev dependencies)
import transformers  # noqa: E402

VOCAB_SIZE = 900
SPECIALS = ("<pad>", "</s>", "<s>", "<unk>")
#: Characters the trained vocabularies lack (they fall back to byte tokens).
RARE = "𝄞🧑🏿‍🚀\U0002a6d6"
EDGE = [
    "", " ", "  ", "   ", "hi", " hi", "  hi", "hi ", "hi  ", "a  b", "a   b\tc", " \n ", "\n", "\n\nx", "\tx\t",
    "x\r\ny", "▁", "▁x ▁", "a▁▁b", RARE, f"a{RARE}b", f" {RARE} ", "机器学习", " 机器", "\u00a0nbsp", "Ω≈ç√",
    "\x00\x01\x7f", "<s>", "<s>hi", "hi<s>", "a <s> b", "a</s>b", "</s> x", "<s><s>", "<pad>x", "<unk>",
    "<tool>", "a<tool>b", "a <tool> b", " <tool>", "<s> <tool>  </s>", "the dog<s>the dog",
]
TEXTS = CORPUS + EDGE


def _training_lines() -> list[str]:
    from lmserve.plugins.tiny_model import _SAMPLE

    return [line for text in CORPUS for line in text.splitlines() if line.strip()] + _SAMPLE.splitlines() * 20


def train_sentencepiece(directory: Path, *, dummy_prefix: bool, split_by_whitespace: bool = True) -> Path:
    """A 900-piece sentencepiece BPE model with byte fallback and a user-defined ``<tool>``,
    as ``tokenizer.model`` and (converted by transformers) ``tokenizer.json``: Llama-style
    (``dummy_prefix``; LlamaTokenizer) or Gemma-style. ``split_by_whitespace=False`` lets
    pieces span words (``▁of▁the``)."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()), model_prefix=str(prefix), vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=0.99, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=dummy_prefix, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_by_whitespace=split_by_whitespace, allow_whitespace_only_pieces=True, user_defined_symbols=["<tool>"])
    prefix.with_suffix(".model").rename(directory / "tokenizer.model")
    prefix.with_suffix(".vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer" if dummy_prefix else "GemmaTokenizer", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}))
    transformers.AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
    return directory


STYLES = {"llama": dict(dummy_prefix=True), "gemma": dict(dummy_prefix=False),
          "gemma-spanning": dict(dummy_prefix=False, split_by_whitespace=False)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentencepiece")
    return {name: train_sentencepiece(root / name, **options) for name, options in STYLES.items()}


def load_hf(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


class RawHF:
    """HF ``tokenizers`` on the ``tokenizer.json`` as written, with transformers' method names.
    (transformers 5's ``LlamaTokenizer`` replaces the file's normalizer and pre-tokenizer
    with its own; what the file says is what this reads.)"""

    def __init__(self, directory: Path):
        import tokenizers

        self.tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) for i in ids]


def is_byte_token(tokenizer, token_id: int) -> bool:
    return byte_token_value(tokenizer.id_to_token(token_id)) is not None


def assert_same_as_hf(tokenizer, hf, texts: list[str], decode: bool = True) -> None:
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False)
        got = tokenizer.encode(text, add_bos=False)
        assert got == expected, f"{text!r}: {hf.convert_ids_to_tokens(got)} != {hf.convert_ids_to_tokens(expected)}"
        if decode:
            for skip in (False, True):
                assert tokenizer.decode(got, skip_special_tokens=skip) == hf.decode(got, skip_special_tokens=skip), text
    assert tokenizer.encode("hi") == hf.encode("hi")  # BOS as the file says


# --- tokenizer.json against HF tokenizers ------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_tokenizer_json_matches_hf(trained, style):
    directory = trained[style]
    tokenizer, hf = tokenizer_from_path(directory), load_hf(directory)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == len(hf)
    assert [tokenizer.id_to_token(i) for i in range(len(hf))] == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.add_bos_token) == ("<s>", "</s>", True)
    assert tokenizer.special_token_ids == {hf.convert_tokens_to_ids(t) for t in hf.all_special_tokens} - {
        hf.convert_tokens_to_ids("<tool>")}
    assert_same_as_hf(tokenizer, hf, TEXTS)
    assert_same_as_hf(tokenizer, RawHF(directory), TEXTS)

    # The texts exercise what sets these tokenizers apart.
    ids = [i for text in TEXTS for i in tokenizer.encode(text, add_bos=False)]
    assert sum(is_byte_token(tokenizer, i) for i in ids) > 50  # byte fallback
    assert tokenizer.encode(RARE[0], add_bos=False)[-4:] == [tokenizer.token_to_id(f"<0x{b:02X}>") for b in RARE[0].encode()]
    assert tokenizer.token_to_id("<tool>") in tokenizer.encode("a<tool>b")
    assert tokenizer.token_to_id("▁▁") in tokenizer.encode("a  b")  # runs of spaces merge
    spanning = [tokenizer.id_to_token(i) for i in ids if "▁" in tokenizer.id_to_token(i).strip("▁")]
    assert bool(spanning) == (style == "gemma-spanning"), spanning[:5]  # merges across words


def test_dummy_prefix_and_leading_space(trained):
    llama, gemma = tokenizer_from_hf_dir(trained["llama"]), tokenizer_from_hf_dir(trained["gemma"])
    hello = llama.encode("Hello", add_bos=False)
    assert llama.id_to_token(hello[0]).startswith("▁")  # the dummy prefix
    assert llama.decode(hello) == "Hello"  # a whole text: HF's decoder strips it
    assert llama.decode_bytes(hello) == b" Hello"  # a continuation keeps it
    assert llama.decode([llama.bos_token_id, *hello]) == "<s> Hello"  # HF strips only a leading space
    assert llama.decode([llama.bos_token_id, *hello], skip_special_tokens=True) == "Hello"
    assert llama.encode(" Hello", add_bos=False) == hello  # Metaspace "first": no second space
    assert not gemma.id_to_token(gemma.encode("Hello", add_bos=False)[0]).startswith("▁")
    assert gemma.decode(gemma.encode(" Hello", add_bos=False)) == " Hello"

    # A text that continues another (a prompt's fragment, a grammar's bytes) gets no prefix:
    # its tokens' bytes are its own (a literal ▁ reads as a space, in HF too).
    for text in TEXTS:
        if not re.search("<s>|</s>|<pad>|<unk>|<tool>|▁", text):
            for tokenizer in (llama, gemma):
                assert tokenizer.decode_bytes(tokenizer.encode(text, False, starts_text=False)) == text.encode(), text
                assert tokenizer.encode_plain(text, starts_text=False) == tokenizer.encode(text, False, starts_text=False)
    assert llama.id_to_token(llama.encode("Hello", False, starts_text=False)[0]) == "Hello"  # not "▁Hello"
    assert llama.encode_plain("Hello") == hello


def _rewrite(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    spec = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (target / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return target


def _legacy_llama(spec):
    """Llama 2's own tokenizer.json: Prepend + Replace normalizers, no pre-tokenizer."""
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None


def _metaspace_split_always(spec):
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}


def _metaspace_decoder(spec):
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}


def _nfkc_gemma(spec):
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}


@pytest.mark.parametrize(
    ("style", "edit"),
    [("llama", _legacy_llama), ("llama", _metaspace_split_always), ("llama", _metaspace_decoder),
     ("gemma", _nfkc_gemma)],
    ids=["llama2-prepend-normalizer", "metaspace-split-always", "metaspace-decoder", "nfkc-normalizer"],
)
def test_tokenizer_json_variants(trained, tmp_path, style, edit):
    directory = _rewrite(trained[style], tmp_path / "variant", edit)
    tokenizer, hf = tokenizer_from_hf_dir(directory), RawHF(directory)
    # HF's Metaspace decoder does not decode byte tokens (it writes "<0xF0>"); ours does.
    decodes_bytes = edit is not _metaspace_decoder
    texts = TEXTS if decodes_bytes else [t for t in TEXTS if not any(
        is_byte_token(tokenizer, i) for i in tokenizer.encode(t))]
    assert_same_as_hf(tokenizer, hf, texts)
    if edit is _legacy_llama:  # a space in front of the text after each added token, and of " hi" too
        assert hf.convert_ids_to_tokens(tokenizer.encode("a<s>b", add_bos=False)) == ["▁a", "<s>", "▁b"]
        assert hf.convert_ids_to_tokens(tokenizer.encode("a<s>b", False, starts_text=False)) == ["a", "<s>", "▁b"]
        assert tokenizer.encode(" hi", add_bos=False)[0] == tokenizer.token_to_id("▁▁")
    if edit is _metaspace_decoder:  # drops every ▁ of the first token
        ids = [tokenizer.token_to_id("▁▁"), tokenizer.token_to_id("x"), tokenizer.token_to_id("▁▁")]
        assert tokenizer.decode(ids) == hf.decode(ids) == "x  "


def test_refuses_what_it_cannot_do(trained, tmp_path):
    def edit(key, value):
        return lambda spec: spec.__setitem__(key, value)

    cases = {
        "Lowercase": edit("normalizer", {"type": "Lowercase"}),
        "Whitespace": edit("pre_tokenizer", {"type": "Whitespace"}),
        "Strip": edit("decoder", {"type": "Strip", "content": " ", "start": 2, "stop": 0}),
        "not written as": lambda spec: spec.update(normalizer=None, pre_tokenizer=None),
    }
    for i, (message, change) in enumerate(cases.items()):
        directory = _rewrite(trained["gemma"], tmp_path / f"bad{i}", change)
        with pytest.raises(ValueError, match=message):
            tokenizer_from_hf_dir(directory)


# --- decoding and streaming --------------------------------------------------


STREAMED = [
    "Hello there 😀👍🏽 then 机器学习 and 日本語 and 한국어.",
    f"{RARE} rare, then   spaces\n\n\tand tabs",
    "<s>the dog</s> and 🇯🇵 flags <tool> é",
    " leading space and trailing ",
]


def stream(tokenizer, ids: list[int], step: int, skip: bool, starts_text: bool) -> tuple[list[str], int]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip, starts_text=starts_text)
    deltas, most_held = [], 0
    for i in range(0, len(ids), step):
        deltas.append(detokenizer.push(ids[i : i + step]))
        most_held = max(most_held, detokenizer.num_held_bytes)
    deltas.append(detokenizer.flush())
    assert detokenizer.text == "".join(deltas)
    return deltas, most_held


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_streaming_assembles_byte_tokens(trained, style):
    tokenizer, hf = tokenizer_from_hf_dir(trained[style]), load_hf(trained[style])
    assert sum(is_byte_token(tokenizer, i) for text in STREAMED for i in tokenizer.encode(text)) > 20
    for text in STREAMED:
        ids = tokenizer.encode(text)
        for skip in (True, False):
            whole = hf.decode(ids, skip_special_tokens=skip)
            continued = tokenizer.decode_bytes(ids, skip).decode("utf-8")
            for step in (1, 2, 3):
                deltas, most_held = stream(tokenizer, ids, step, skip, starts_text=True)
                assert "".join(deltas) == whole
                assert not any("\ufffd" in delta for delta in deltas) and deltas[-1] == ""
                deltas, _ = stream(tokenizer, ids, step, skip, starts_text=False)
                assert "".join(deltas) == continued
            # Where a character falls back to byte tokens, its first bytes waited for the rest.
            assert (most_held > 0) == any(is_byte_token(tokenizer, i) for i in ids)
    # A continuation keeps the dummy prefix's space; a whole text drops it (Llama-style only).
    hello = tokenizer.encode("Hello", add_bos=False)
    expected = " Hello" if style == "llama" else "Hello"
    assert "".join(stream(tokenizer, hello, 1, True, starts_text=False)[0]) == expected
    assert "".join(stream(tokenizer, hello, 1, True, starts_text=True)[0]) == "Hello"


def test_text_start_is_the_first_token_that_writes(trained):
    llama = tokenizer_from_hf_dir(trained["llama"])
    space, hello = llama.token_to_id("▁"), llama.encode("Hello", add_bos=False)
    eos = llama.eos_token_id
    # Strip(" ", 1, 0): one space off the whole text, wherever the first token splits it.
    assert llama.decode([space, *hello]) == " Hello"
    assert llama.decode([eos, *hello], skip_special_tokens=True) == "Hello"
    assert "".join(stream(llama, [eos, space, *hello], 1, True, starts_text=True)[0]) == " Hello"
    assert "".join(stream(llama, [eos, *hello], 1, False, starts_text=True)[0]) == "</s> Hello"


def test_piece_bytes():
    assert piece_bytes("▁the") == b" the" and piece_bytes("<0x0A>") == b"\n" and piece_bytes("<0x0a>") == b"\n"
    assert piece_bytes("<0x0AB>") == b"<0x0AB>" and byte_token_value("<0xFF>") == 255


# --- the merge rule, built directly ------------------------------------------


def _bytes_and(pieces: list[str]) -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)] + pieces


def test_scores_merge_best_first_then_leftmost():
    pieces = _bytes_and(["a", "b", "ab", "ba", "▁", "▁a"])
    ids = {p: i for i, p in enumerate(pieces)}

    def tokens(text, scores):
        tokenizer = SentencePieceTokenizer(pieces, scores={ids[p]: s for p, s in scores.items()})
        return [tokenizer.id_to_token(i) for i in tokenizer.encode(text)]

    assert tokens("aba", {"ab": -1.0, "ba": -1.0}) == ["ab", "a"]  # a tie: the leftmost pair
    assert tokens("aba", {"ab": -2.0, "ba": -1.0}) == ["a", "ba"]  # the higher score first
    assert tokens("a a", {"▁a": 0.0}) == ["a", "▁a"]
    assert tokens("ac", {}) == ["a", "<0x63>"]  # byte fallback


def test_merges_rank_pairs_and_unknown_characters_without_byte_tokens():
    pieces = ["<unk>", "a", "b", "ab", "▁"]
    tokenizer = SentencePieceTokenizer(pieces, [AddedToken(0, "<unk>", True)], merges=[("a", "b")],
                                       unk_token_id=0, space_prefix="always")
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("abxyab")] == ["▁", "ab", "<unk>", "ab"]  # fused
    with pytest.raises(ValueError, match="either merges or scores"):
        SentencePieceTokenizer(pieces)


# --- GGUF, written by llama.cpp's converter, against sentencepiece --------------


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory) -> dict[str, Path]:
    from tests.family_checks import convert_to_gguf, write_family_model

    root = tmp_path_factory.mktemp("sentencepiece-gguf")
    config = dict(vocab_size=VOCAB_SIZE, bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    paths = {}
    for style, config_class, extra in [("llama", "LlamaConfig", {}), ("gemma", "Gemma2Config", dict(head_dim=16))]:
        directory = root / style
        shutil.copytree(trained[style], directory)
        write_family_model(directory, config_class, tokenizer=config, norm_center=0.0, **extra)
        paths[style] = convert_to_gguf(directory, root / f"{style}.gguf")
    return paths


_ADDED = re.compile("(<s>|</s>|<pad>|<unk>)")


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_gguf_matches_sentencepiece(trained, converted, style):
    tokenizer = tokenizer_from_gguf(converted[style])
    reference = tokenizer_from_hf_dir(trained[style])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(trained[style] / "tokenizer.model"))
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size == VOCAB_SIZE
    assert [tokenizer.id_to_token(i) for i in range(VOCAB_SIZE)] == [reference.id_to_token(i) for i in range(VOCAB_SIZE)]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.add_bos_token) == (2, 1, True)
    assert tokenizer.special_token_ids == {0, 1, 2, 3}
    for text in TEXTS:
        if "<tool>" in text:  # user-defined in sentencepiece, an ordinary token in the GGUF
            continue
        # llama.cpp: added tokens first; each text between them as sentencepiece encodes it
        # alone (with its dummy prefix where the model has one).
        expected = []
        for part in _ADDED.split(text):
            expected += [tokenizer.token_to_id(part)] if _ADDED.fullmatch(part) else sp.encode(part)
        ids = tokenizer.encode(text, add_bos=False)
        assert ids == expected, f"{text!r}: {[tokenizer.id_to_token(i) for i in ids]} != {sp.id_to_piece(expected)}"
        if not _ADDED.search(text):
            assert tokenizer.decode(ids) == sp.decode(ids), text
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    if style == "gemma":  # no dummy prefix: tokenizer.json and GGUF agree to the id
        for text in TEXTS:
            if "<tool>" not in text:
                assert tokenizer.encode(text) == reference.encode(text), text
