"""The grammar compiler and its constraints over the tiny tokenizer: the masks
they write, the tokens they accept, when they end, errors naming response_format,
and the per-format cache, bounded by count and by bytes (the limits on hostile
formats: tests/security/test_grammar_limits.py)."""

import json
import re

import numpy as np
import pytest

from lmserve.core.structured_output import GrammarCache, OutputGrammar, TokenConstraint
from lmserve.core.types import InvalidRequestError
from lmserve.plugins.llguidance_grammar import LLGuidanceCompiler
from lmserve.plugins.tokenizer_files import tokenizer_from_path
from tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(directory)
    return tokenizer_from_path(directory)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return LLGuidanceCompiler(tokenizer)


def allowed(constraint: TokenConstraint, vocab_size: int) -> np.ndarray:
    row = np.zeros((vocab_size + 31) // 32, np.int32)
    constraint.fill_bitmask(row)
    return np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size].nonzero()[0]


def generate(constraint: TokenConstraint, tokenizer, rng: np.random.Generator, limit: int = 200) -> str:
    """Random tokens among those allowed, until the grammar is finished or only EOS is left."""
    ids = []
    for _ in range(limit):
        choices = allowed(constraint, tokenizer.vocab_size)
        assert choices.size, "a constraint must always allow something"
        if constraint.is_accepting() and (tokenizer.eos_token_id in choices and rng.random() < 0.3
                                          or choices.tolist() == [tokenizer.eos_token_id]):
            break
        token = int(rng.choice([c for c in choices if c != tokenizer.eos_token_id]))
        assert constraint.accept(token), constraint.error
        ids.append(token)
        if constraint.is_finished():
            break
    return tokenizer.decode(ids)


def test_random_walks_through_a_schema_give_valid_json(compiler, tokenizer):
    schema = {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 99}},
              "required": ["kind", "n"], "additionalProperties": False}
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = generate(compiler.constraint(OutputGrammar.json_schema(schema)), tokenizer, rng)
        value = json.loads(text)
        assert value["kind"] in ("x", "y") and 0 <= value["n"] <= 99 and set(value) == {"kind", "n"}


def test_json_is_written_with_json_dumps_spacing(compiler, tokenizer):
    constraint = compiler.constraint(OutputGrammar.json_schema({"type": "object", "properties": {"a": {"const": 1}},
                                                                "required": ["a"], "additionalProperties": False}))
    text = generate(constraint, tokenizer, np.random.default_rng(1))
    assert text == '{"a": 1}'


def test_a_regex_walk_matches_the_regex(compiler, tokenizer):
    rng = np.random.default_rng(2)
    for _ in range(20):
        text = generate(compiler.constraint(OutputGrammar.regex(r"(ab|c)[0-9]{2}")), tokenizer, rng)
        assert re.fullmatch(r"(ab|c)[0-9]{2}", text), text


def test_a_refused_token_is_reported_not_raised(compiler, tokenizer):
    constraint = compiler.constraint(OutputGrammar.regex("a+"))
    assert not constraint.accept(tokenizer.encode("b")[0])
    assert constraint.error


def test_each_generation_gets_its_own_state_from_one_compiled_format(compiler, tokenizer):
    grammar = OutputGrammar.regex("ab")
    first, second = compiler.constraint(grammar), compiler.constraint(grammar)
    assert compiler.is_compiled(grammar)
    assert first.accept(tokenizer.encode("a")[0])
    assert allowed(second, tokenizer.vocab_size).tolist() != allowed(first, tokenizer.vocab_size).tolist()


def test_the_cache_keeps_the_most_recent_formats(tokenizer):
    compiler = LLGuidanceCompiler(tokenizer, cache_size=2)
    grammars = [OutputGrammar.regex(pattern) for pattern in ("a", "b", "c")]
    for grammar in grammars:
        compiler.constraint(grammar)
    assert [compiler.is_compiled(g) for g in grammars] == [False, True, True]


def test_the_cache_is_bounded_by_bytes_least_recently_used_first():
    cache = GrammarCache(max_entries=100, max_bytes=100)
    assert cache.put("a", "A", 40) == 0 and cache.put("b", "B", 40) == 0
    assert cache.get("a") == "A"  # now "b" is the least recently used
    assert cache.put("c", "C", 40) == 40
    assert cache.keys() == ["a", "c"] and cache.num_bytes == 80
    assert cache.put("d", "D", 90) == 80  # both others go to make room
    assert cache.keys() == ["d"] and cache.num_bytes == 90


def test_the_cache_is_bounded_by_count_too_and_keeps_nothing_over_its_budget():
    cache = GrammarCache(max_entries=2, max_bytes=1000)
    for key in "abc":
        cache.put(key, key.upper(), 1)
    assert cache.keys() == ["b", "c"] and cache.num_bytes == 2
    assert cache.put("huge", "H", 1001) == 0  # larger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and cache.keys() == ["b", "c"]
    cache.put("b", "B2", 5)  # a new value for a key replaces it and its size
    assert cache.get("b") == "B2" and cache.num_bytes == 6
    cache.pop("b")
    assert cache.keys() == ["c"] and cache.num_bytes == 1


def test_the_compiler_charges_each_grammar_at_least_its_size_floor(tokenizer):
    compiler = LLGuidanceCompiler(tokenizer)
    compiler.constraint(OutputGrammar.regex("ab"))
    small = compiler.cache.num_bytes
    words = "|".join(f"w{i}" for i in range(2000))
    compiler.constraint(OutputGrammar.regex(words))
    assert small >= 64 * 1024
    assert compiler.cache.num_bytes - small >= 64 * len(words)  # the text alone is ~13 KB


def test_a_grammar_budget_smaller_than_one_grammar_keeps_none_and_still_compiles(tokenizer):
    tight = LLGuidanceCompiler(tokenizer, cache_bytes=1024)
    assert tight.constraint(OutputGrammar.regex("a+")).accept(tokenizer.encode("a")[0])
    assert not tight.is_compiled(OutputGrammar.regex("a+")) and tight.cache.num_bytes == 0


def test_json_object_means_any_object(compiler, tokenizer):
    constraint = compiler.constraint(OutputGrammar.json_object())
    first = allowed(constraint, tokenizer.vocab_size)
    assert {tokenizer.decode([int(token)])[0] for token in first} == {"{"}


@pytest.mark.parametrize("grammar, words", [
    (OutputGrammar.json_schema({"type": "nonsense"}), "invalid schema"),
    (OutputGrammar("json_schema", "{not json"), "response_format"),
    (OutputGrammar.regex("[a-"), "invalid regular expression"),
])
def test_invalid_formats_raise_naming_response_format(compiler, grammar, words):
    with pytest.raises(InvalidRequestError) as info:
        compiler.constraint(grammar)
    assert info.value.param == "response_format" and words in info.value.message
    assert "\n" not in info.value.message


def test_properties_come_out_in_the_schemas_order(compiler, tokenizer):
    schema = {"type": "object", "properties": {"zeta": {"const": 1}, "alpha": {"const": 2}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    text = generate(compiler.constraint(OutputGrammar.json_schema(schema)), tokenizer, np.random.default_rng(3))
    assert text == '{"zeta": 1, "alpha": 2}'
