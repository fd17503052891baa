"""Structured outputs: a response format turned into a grammar that constrains
generation token by token.

A request's format (:class:`OutputGrammar`: a JSON schema, any JSON object, or a
regular expression) is compiled once per distinct format by
:class:`GrammarCompiler` (llguidance, over the model's own vocabulary) and
cached; each generation then gets its own :class:`TokenConstraint`, a cheap copy
of the compiled grammar that follows that generation's tokens.

The engine asks a constraint three things per step, and nothing else:
which tokens may come next (:meth:`TokenConstraint.fill_bitmask`, one bit per
token, the layout the sampler kernels read), whether the text so far is
complete (:meth:`TokenConstraint.is_accepting`: the end-of-turn tokens are
allowed then), and to follow the token it sampled (:meth:`TokenConstraint.accept`).
The engine stays unaware of grammars; any object with those methods works.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from lmserve.core.types import InvalidRequestError

if TYPE_CHECKING:  # annotations only
    import numpy as np

    from lmserve.core.tokenizer import Tokenizer

GrammarKind = Literal["json_schema", "regex"]

#: JSON as models write it, spaced like ``json.dumps``, and no other whitespace:
#: a small model cannot wander into endless newlines inside a constrained object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Any JSON object (``response_format: {"type": "json_object"}``).
ANY_JSON_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class OutputGrammar:
    """What a generation's text must match: ``kind`` ``json_schema`` (``source``
    is the schema as JSON text) or ``regex``. Hashable: the compiler caches by it."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> OutputGrammar:
        # Key order kept: required properties come out in the schema's order (as OpenAI's).
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> OutputGrammar:
        return cls("json_schema", ANY_JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> OutputGrammar:
        return cls("regex", pattern)


@runtime_checkable
class TokenConstraint(Protocol):
    """One generation's grammar state, as the engine uses it (one step at a time)."""

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into ``row`` (int32 ``[ceil(vocab / 32)]``:
        bit ``j`` of word ``w`` set allows token ``32 w + j``)."""

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete match (ending here is allowed)."""

    def is_finished(self) -> bool:
        """Whether nothing but the end may follow."""

    def accept(self, token_id: int) -> bool:
        """Follow a sampled token; False when the grammar does not allow it
        (:attr:`error` says why)."""

    @property
    def error(self) -> str | None: ...


class GrammarConstraint:
    """A :class:`TokenConstraint` over an llguidance matcher.

    ``grammar``: what it was compiled from; a backend in another process compiles
    its own from it (a matcher does not cross processes)."""

    def __init__(self, matcher, grammar: OutputGrammar | None = None):
        self._matcher = matcher
        self.grammar = grammar

    def fill_bitmask(self, row: np.ndarray) -> None:
        if not (row.dtype.name == "int32" and row.ndim == 1 and row.flags.c_contiguous):
            raise ValueError("the bitmask row must be a contiguous int32 vector")
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def accept(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles :class:`OutputGrammar` s over one tokenizer's vocabulary, caching
    the most recent ``cache_size`` of them; thread-safe (compiling runs off the
    event loop)."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256):
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._compiled: OrderedDict[OutputGrammar, object] = OrderedDict()
        self._lock = threading.Lock()
        self._vocabulary = None  # llguidance's view of the tokenizer, built on first use

    def constraint(self, grammar: OutputGrammar) -> GrammarConstraint:
        """A fresh constraint for one generation; :class:`InvalidRequestError`
        (``param`` ``response_format``) when the grammar is invalid."""
        return GrammarConstraint(self._compile(grammar).deep_copy(), grammar)

    def is_compiled(self, grammar: OutputGrammar) -> bool:
        with self._lock:
            return grammar in self._compiled

    def _compile(self, grammar: OutputGrammar):
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
            vocabulary = self._llguidance_vocabulary()
        import llguidance

        try:
            if grammar.kind == "json_schema":
                text = llguidance.LLMatcher.grammar_from_json_schema(grammar.source, overrides=JSON_LAYOUT)
            elif grammar.kind == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(grammar.source)
            else:
                raise InvalidRequestError(f"Unknown grammar kind {grammar.kind!r}.", "response_format")
        except ValueError as exc:  # the schema is not JSON
            raise InvalidRequestError(f"response_format: {exc}", "response_format") from exc
        matcher = llguidance.LLMatcher(vocabulary, text, log_level=0)
        if matcher.is_error():
            what = "schema" if grammar.kind == "json_schema" else "regular expression"
            raise InvalidRequestError(f"response_format: invalid {what}: {_gist(matcher.get_error())}",
                                      "response_format")
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def _llguidance_vocabulary(self):
        if self._vocabulary is None:
            self._vocabulary = llguidance_tokenizer(self._tokenizer)
        return self._vocabulary


def llguidance_tokenizer(tokenizer: Tokenizer):
    """llguidance's tokenizer over ``tokenizer``'s vocabulary (special tokens
    marked with a leading 0xFF byte, as llguidance expects; EOS ends a match)."""
    import llguidance

    special = tokenizer.special_token_ids

    class _Vocabulary:
        eos_token_id = tokenizer.eos_token_id
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = sorted(special)
        tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                  for i in range(tokenizer.vocab_size)]

        def __call__(self, text):
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text, add_bos=False)

    if tokenizer.eos_token_id is None:
        raise ValueError("Structured outputs need a tokenizer with an end-of-sequence token.")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary()))


def _gist(message: str) -> str:
    """llguidance's error: its first line and the ``error:`` lines (not the caret diagrams)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    return " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])
