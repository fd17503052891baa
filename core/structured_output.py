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

A format comes from a client, and a short one can be costly: ``(b{1000}){1000}``
is 15 characters, and with llguidance's default limits it took 1-2 s and 170 MB to
fail. So the grammar engine runs with limits on the work and memory of one
grammar (:data:`GRAMMAR_LIMITS`), a format over them is an
:class:`InvalidRequestError` (a 400) that says which limit, never the engine's
internal state, and the cache of compiled grammars is bounded by their bytes as
well as their number (:class:`GrammarCache`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from lmserve.core.native_heap import give_back_free_heap, heap_bytes_in_use
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

MiB = 1024 * 1024

# The grammar engine's limits for one grammar (llguidance's ``LLParserLimits``),
# measured on SmolLM2's 49,152-token vocabulary. Lexer work is llguidance's "fuel":
# about 50 units a microsecond, and for a regex bomb ~190 bytes a unit.
#: Lexer work before the first token. llguidance's default, 1,000,000, let
#: ``(b{1000}){1000}`` take 1-2 s and 170 MB before failing; 200,000 fails it in
#: 0.1-0.3 s and ~37 MB (given back), and still compiles a 20,000-word alternation
#: (50,000 words are refused; any schema or pattern the tests use is far below).
INITIAL_LEXER_FUEL = 200_000
#: Lexer work for one token's mask (llguidance's default: ~15 ms at most).
STEP_LEXER_FUEL = 200_000
#: Lexer states one grammar may build over its life, shared by all the generations
#: that follow it (hundreds of bytes to ~2 KB each). llguidance's default, 250,000,
#: allowed hundreds of MB for one grammar; 50,000 stops the bombs above in ~20 MB.
MAX_LEXER_STATES = 50_000
#: Symbols in the grammar's productions (llguidance's default).
MAX_GRAMMAR_SYMBOLS = 500_000
#: Parser items for one token's mask (llguidance's default).
STEP_MAX_ITEMS = 50_000
GRAMMAR_LIMITS = {
    "initial_lexer_fuel": INITIAL_LEXER_FUEL,
    "step_lexer_fuel": STEP_LEXER_FUEL,
    "max_lexer_states": MAX_LEXER_STATES,
    "max_grammar_size": MAX_GRAMMAR_SYMBOLS,
    "step_max_items": STEP_MAX_ITEMS,
    "verbose_errors": False,  # errors without the parser's state and the grammar's text
}
#: Characters of a format's source (a schema's JSON, a pattern), checked before any
#: work: building the grammar of a 50,000-word alternation (450 KB) takes ~0.3 s.
MAX_GRAMMAR_SOURCE_CHARS = 512 * 1024
#: Tokens followed at compile time, so that a lexer that blows up at once does so
#: there (see :func:`_rehearse`).
REHEARSAL_TOKENS = 3
#: The cache of compiled grammars: at most this many...
GRAMMAR_CACHE_SIZE = 256
#: ...and at most this many bytes, by the compiler's estimate.
GRAMMAR_CACHE_BYTES = 256 * MiB
#: Evicting this much at once (or refusing a grammar over the limits) hands the
#: free heap back to the operating system.
TRIM_AFTER_EVICTING_BYTES = 16 * MiB
#: How much of an unexpected engine error goes to the server's log.
LOGGED_ERROR_CHARS = 500
#: How much of an engine error a client sees (a pattern's error may quote the pattern).
CLIENT_ERROR_CHARS = 300

_WHAT = {"json_schema": "schema", "regex": "regular expression"}
#: Words of the engine's errors that mean a limit was reached, and that limit as a client reads it.
_LIMIT_ERRORS = (
    ("grammar size", f"{MAX_GRAMMAR_SYMBOLS:,} grammar symbols"),
    ("too many states", f"{MAX_LEXER_STATES:,} lexer states"),
    ("initial lexer configuration", f"{INITIAL_LEXER_FUEL:,} units of lexer work"),
    ("too many expressions", f"{STEP_LEXER_FUEL:,} units of lexer work"),
    ("fuel", f"{STEP_LEXER_FUEL:,} units of lexer work"),
    ("too many items", f"{STEP_MAX_ITEMS:,} parser items per token"),
    ("schema too large", "the schema compiler's size limit"),
)

logger = logging.getLogger(__name__)


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
    its own from it (a matcher does not cross processes). ``on_limit``: called with
    ``grammar`` when the grammar engine reaches one of its limits while following
    tokens (the compiled grammar is then broken for every generation that shares it:
    its compiler forgets it)."""

    def __init__(self, matcher, grammar: OutputGrammar | None = None,
                 on_limit: Callable[[OutputGrammar | None], None] | None = None):
        self._matcher = matcher
        self.grammar = grammar
        self._on_limit = on_limit

    def fill_bitmask(self, row: np.ndarray) -> None:
        if not (row.dtype.name == "int32" and row.ndim == 1 and row.flags.c_contiguous):
            raise ValueError("the bitmask row must be a contiguous int32 vector")
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def accept(self, token_id: int) -> bool:
        if self._matcher.consume_token(token_id):
            return True
        if self._on_limit is not None and _limit_reached(self._matcher.get_error()) is not None:
            self._on_limit(self.grammar)
        return False

    @property
    def error(self) -> str | None:
        """Why the last token was refused, in a sentence fit for a client (none of
        the engine's internal state)."""
        if not self._matcher.is_error():
            return None
        error = self._matcher.get_error()
        limit = _limit_reached(error)
        if limit is None:
            return _gist(error)
        what = _WHAT.get(self.grammar.kind, "format") if self.grammar is not None else "format"
        return _too_complex(what, limit).removeprefix("response_format: ")


class GrammarCache:
    """Compiled grammars by format, bounded both by their number and by their
    estimated bytes; the least recently used go first. Thread-safe.

    The byte bound is what matters: one compiled grammar may take 40 KB or tens
    of MB. A value larger than the whole budget is not kept at all (its request
    still uses it). Sizes are whatever the caller estimates
    (:meth:`GrammarCompiler` says how it does)."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[Hashable]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: Hashable):
        """The value for ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value, num_bytes: int) -> int:
        """Keep ``value`` as the most recently used, then evict the least recently
        used until both bounds hold; returns the bytes evicted."""
        evicted = []  # dropped after the lock is released: freeing a big grammar takes a while
        with self._lock:
            if key in self._entries:
                evicted.append(self._remove(key))
            if num_bytes > self.max_bytes:
                return 0
            self._entries[key] = (value, num_bytes)
            self.num_bytes += num_bytes
            while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
                evicted.append(self._remove(next(iter(self._entries))))
        return sum(size for _, size in evicted)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            entry = self._remove(key) if key in self._entries else None
        del entry

    def _remove(self, key: Hashable) -> tuple[object, int]:
        entry = self._entries.pop(key)
        self.num_bytes -= entry[1]
        return entry


class GrammarTooComplexError(InvalidRequestError):
    """A format over the grammar engine's limits (:data:`GRAMMAR_LIMITS`)."""


class GrammarCompiler:
    """Compiles :class:`OutputGrammar` s over one tokenizer's vocabulary within the
    grammar engine's limits, and caches them; thread-safe (compiling runs off the
    event loop).

    One compile runs at a time: a grammar refused for its size has still taken up
    to a few tens of MB while it was built, and twenty at once would take twenty
    times that. A compile within the limits takes milliseconds, one over them
    0.1-0.3 s (:data:`INITIAL_LEXER_FUEL`), so a queue behind it stays short.

    The cache (:class:`GrammarCache`, ``cache_size`` grammars and ``cache_bytes``)
    charges each grammar what the C heap's bytes in use grew by across its compile
    (:func:`~lmserve.core.native_heap.heap_bytes_in_use`; compiles do not overlap,
    so that is this grammar's lexer and parser tables, plus whatever other threads
    allocated meanwhile and still hold: an overestimate, not an underestimate), and
    never less than :func:`_size_floor` of its text, which is also the whole
    estimate where the heap cannot be measured. What a grammar's lexer grows while
    generations follow it is not charged; :data:`MAX_LEXER_STATES` bounds it.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = GRAMMAR_CACHE_SIZE,
                 cache_bytes: int = GRAMMAR_CACHE_BYTES):
        self._tokenizer = tokenizer
        self.cache = GrammarCache(cache_size, cache_bytes)
        self._compiling = threading.Lock()
        self._vocabulary = None  # llguidance's view of the tokenizer, built on first use

    def constraint(self, grammar: OutputGrammar) -> GrammarConstraint:
        """A fresh constraint for one generation; :class:`InvalidRequestError`
        (``param`` ``response_format``) when the grammar is invalid, and its
        subclass :class:`GrammarTooComplexError` when it is over the limits."""
        return GrammarConstraint(self._compile(grammar).deep_copy(), grammar, self.forget)

    def is_compiled(self, grammar: OutputGrammar) -> bool:
        return grammar in self.cache

    def forget(self, grammar: OutputGrammar | None) -> None:
        """Drop ``grammar`` from the cache (the generations using it keep their copies)."""
        self.cache.pop(grammar)

    def _compile(self, grammar: OutputGrammar):
        matcher = self.cache.get(grammar)
        if matcher is not None:
            return matcher
        with self._compiling:
            matcher = self.cache.get(grammar)  # compiled while this thread waited
            if matcher is not None:
                return matcher
            vocabulary = self._llguidance_vocabulary()
            before = heap_bytes_in_use()
            try:
                matcher, text = _compile_within_limits(grammar, vocabulary, self._tokenizer.eos_token_id)
            except GrammarTooComplexError:
                give_back_free_heap()  # what it took is free now, but resident in this thread's arena
                raise
            after = heap_bytes_in_use()
            grown = after - before if before is not None and after is not None else 0
            evicted = self.cache.put(grammar, matcher, max(grown, _size_floor(text)))
        if evicted >= TRIM_AFTER_EVICTING_BYTES:
            give_back_free_heap()
        return matcher

    def _llguidance_vocabulary(self):
        if self._vocabulary is None:
            self._vocabulary = llguidance_tokenizer(self._tokenizer)
        return self._vocabulary


def _size_floor(grammar_text: str) -> int:
    """The least a compiled grammar is charged: 64 KiB and 64 bytes per character of
    its llguidance text. Measured on a 49k-token vocabulary, compiled grammars took
    35-125 KB for small formats, 25-40 bytes per character for large schemas, enums
    and alternations (1 MB for a 300-property schema, 6 MB for a 20,000-word
    alternation); a grammar whose lexer explodes from a short text is caught by the
    limits, not by this floor."""
    return 64 * 1024 + 64 * len(grammar_text)


def _compile_within_limits(grammar: OutputGrammar, vocabulary, eos_token_id: int) -> tuple[object, str]:
    """The matcher for ``grammar`` and its llguidance text; :class:`InvalidRequestError`
    naming ``response_format`` for anything the engine refuses or raises."""
    import llguidance

    if grammar.kind not in _WHAT:
        raise InvalidRequestError(f"Unknown grammar kind {grammar.kind!r}.", "response_format")
    what = _WHAT[grammar.kind]
    if len(grammar.source) > MAX_GRAMMAR_SOURCE_CHARS:
        raise GrammarTooComplexError(_too_complex(what, f"{MAX_GRAMMAR_SOURCE_CHARS:,} characters"),
                                     "response_format")
    try:
        try:
            if grammar.kind == "json_schema":
                text = llguidance.LLMatcher.grammar_from_json_schema(grammar.source, overrides=JSON_LAYOUT)
            else:
                text = llguidance.LLMatcher.grammar_from_regex(grammar.source)
        except ValueError as exc:  # the schema is not JSON
            raise InvalidRequestError(f"response_format: {_gist(str(exc))}", "response_format") from exc
        matcher = llguidance.LLMatcher(vocabulary, text, log_level=0, limits=_parser_limits())
        error = matcher.get_error() if matcher.is_error() else _rehearse(matcher, eos_token_id)
        if error is not None:
            matcher = None  # freed now, not when the traceback that holds this frame goes
            raise _refusal_error(error, grammar.kind)
        return matcher, text
    except InvalidRequestError:
        raise
    except BaseException as exc:  # also pyo3's PanicException (a BaseException): a Rust panic
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logger.warning("The grammar engine failed on a %s (%d characters): %s: %s", what, len(grammar.source),
                       type(exc).__name__, str(exc)[:LOGGED_ERROR_CHARS])
        raise InvalidRequestError(f"response_format: this server could not compile the {what}.",
                                  "response_format") from None


def _rehearse(matcher, eos_token_id: int) -> str | None:
    """Follow the grammar for :data:`REHEARSAL_TOKENS` tokens on a copy (each time
    the lowest allowed token other than EOS); the engine's error, or None.

    llguidance builds its lexer lazily: a pattern such as ``(b{1000}){1000}`` makes
    a matcher without complaint, spends its lexer fuel on the first mask (which
    reports nothing) and fails when the first token is consumed: in the engine, as
    a 500, before this walk. Walking a few tokens here does that work (and pays for
    it) at compile time, where a failure is a 400, and warms the lexer that the real
    generations share. A pattern that blows up only later is stopped by the same
    limits while generating, and the grammar is forgotten then
    (:class:`GrammarConstraint`)."""
    walker = matcher.deep_copy()
    for _ in range(REHEARSAL_TOKENS):
        mask = walker.compute_bitmask()
        if walker.is_error():
            return walker.get_error()
        token = _lowest_allowed(mask, eos_token_id)
        if token is None:
            return None
        if not walker.consume_token(token):  # where a mask's lexer work failed, too: it shows here
            return walker.get_error()
    return None


def _lowest_allowed(mask: bytes, excluded: int) -> int | None:
    """The lowest token whose bit is set in ``mask`` (little-endian 32-bit words,
    as llguidance writes them), ``excluded`` aside."""
    bits = int.from_bytes(mask, "little")
    if excluded is not None and excluded >= 0:
        bits &= ~(1 << excluded)
    return (bits & -bits).bit_length() - 1 if bits else None


def _parser_limits():
    import llguidance

    return llguidance.LLParserLimits(**GRAMMAR_LIMITS)


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
            # A piece of output, not the start of a text: no SentencePiece space prefix.
            return tokenizer.encode(text, add_bos=False, starts_text=False)

    if tokenizer.eos_token_id is None:
        raise ValueError("Structured outputs need a tokenizer with an end-of-sequence token.")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary()))


def _limit_reached(error: str) -> str | None:
    """The limit that an engine error says was reached, as a client reads it; None
    for any other error."""
    text = error.lower()
    return next((limit for words, limit in _LIMIT_ERRORS if words in text), None)


def _too_complex(what: str, limit: str) -> str:
    return f"response_format: the {what} is too large or complex for this server (limit: {limit})."


def _refusal_error(error: str, kind: GrammarKind) -> InvalidRequestError:
    """The client's error for an engine error about a format of ``kind``."""
    what = _WHAT.get(kind, "format")
    limit = _limit_reached(error)
    if limit is not None:
        return GrammarTooComplexError(_too_complex(what, limit), "response_format")
    return InvalidRequestError(f"response_format: invalid {what}: {_gist(error)}", "response_format")


def _gist(message: str) -> str:
    """llguidance's error: its first line and the ``error:`` lines (not the caret
    diagrams, nor the state dumps), cut to :data:`CLIENT_ERROR_CHARS`."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    gist = " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])
    return gist if len(gist) <= CLIENT_ERROR_CHARS else gist[:CLIENT_ERROR_CHARS - 3] + "..."
