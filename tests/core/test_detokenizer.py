"""Streaming detokenization: deltas add up to the full decode and never split a character."""

from __future__ import annotations

import pytest

from lmserve.core.detokenizer import IncrementalDetokenizer
from lmserve.core.tokenizer import Tokenizer, bytes_to_spelled
from lmserve.plugins.tokenizer_files import tokenizer_from_gguf, tokenizer_from_hf_dir
from tiny_tokenizer import write_tiny_tokenizer

TEXTS = [
    "Hello there, the quick brown fox! 😀👍🏽 then 机器学习 and 日本語 and 한국어.",
    "👨‍👩‍👧‍👦🏳️‍🌈🇺🇸🇯🇵🧑🏿‍🚀 family, flag, astronaut",
    "<|im_start|>assistant\nSure: café, naïve, Ångström ∑∫√ — done.<|im_end|>",
    "def f(x):\n    return x  # 注释 ✓\n\n\t\tend<|endoftext|>",
    "\U00020000 rare plane \U0010fffd and \u00a0nbsp",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(directory)
    return tokenizer_from_hf_dir(directory)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True, step: int = 1):
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    deltas = [detokenizer.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detokenizer.flush())
    return detokenizer, deltas


def check_streaming(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=False)
        for skip in (True, False):
            for step in (1, 2, 3):
                detokenizer, deltas = stream(tokenizer, ids, skip, step)
                assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
                assert not any("\ufffd" in delta for delta in deltas), deltas
                assert detokenizer.text == "".join(deltas)
                assert detokenizer.token_ids == ids
                assert deltas[-1] == ""  # nothing was left held for a valid text
        expected = text
        for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            expected = expected.replace(special, "")
        assert "".join(stream(tokenizer, ids)[1]) == expected


def test_tiny_streaming(tiny):
    check_streaming(tiny)


@pytest.mark.real_model
def test_smollm2_streaming(smollm2):
    check_streaming(smollm2)


def test_holds_incomplete_characters(tiny):
    emoji = "😀".encode()  # four byte tokens in the tiny vocabulary
    ids = [tiny.token_to_id(bytes_to_spelled(bytes((b,)))) for b in emoji]
    assert [tiny.token_bytes(i) for i in ids] == [bytes((b,)) for b in emoji]
    detokenizer = IncrementalDetokenizer(tiny)
    assert [detokenizer.push([i]) for i in ids[:3]] == ["", "", ""]
    assert detokenizer.num_held_bytes == 3
    assert detokenizer.push(ids[3]) == "😀"  # a bare int works too
    assert detokenizer.num_held_bytes == 0

    detokenizer = IncrementalDetokenizer(tiny)
    assert detokenizer.push(tiny.encode("ok") + ids[:2]) == "ok"
    assert detokenizer.flush() == "\ufffd"  # held bytes come out, as one replacement character
    assert detokenizer.text == "ok\ufffd"
    assert detokenizer.text == tiny.decode(detokenizer.token_ids)


def test_special_tokens(tiny):
    end = tiny.eos_token_id
    ids = tiny.encode("the end") + [end]
    skipping, kept = IncrementalDetokenizer(tiny), IncrementalDetokenizer(tiny, skip_special_tokens=False)
    assert skipping.push(ids) == "the end" and skipping.push([end]) == ""
    assert kept.push(ids) == "the end<|im_end|>"


def test_invalid_bytes_are_replaced_at_once(tiny):
    detokenizer = IncrementalDetokenizer(tiny)
    stray = tiny.token_to_id(bytes_to_spelled(b"\x80"))  # a lone continuation byte
    assert detokenizer.push([stray, *tiny.encode("a")]) == "\ufffda"
    assert detokenizer.flush() == ""
