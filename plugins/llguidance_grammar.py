"""The built-in grammar engine: structured outputs compiled with llguidance.

A plugin of :hook:`lmserve_grammar_compiler`: it offers an
:class:`LLGuidanceCompiler` over the model's tokenizer, which turns each
:class:`~lmserve.core.structured_output.OutputGrammar` into llguidance's grammar
text, compiles it over the model's own vocabulary once per distinct format
(cached in a :class:`~lmserve.core.structured_output.GrammarCache`), and gives
each generation an :class:`LLGuidanceConstraint`, a cheap copy of the compiled
matcher. Where llguidance is not installed the hook offers nothing, and the
server answers requests that need a grammar with a 400.

A format comes from a client, and a short one can be costly: ``(b{1000}){1000}``
is 15 characters, and with llguidance's default limits it took 1-2 s and 170 MB to
fail. So llguidance runs with limits on the work and memory of one grammar
(:data:`GRAMMAR_LIMITS`), a format over them is a
:class:`~lmserve.core.structured_output.GrammarTooComplexError` (a 400) that says
which limit, never the engine's internal state, and the cache is charged what
each grammar took from the C heap (:class:`LLGuidanceCompiler`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmserve.core import hookimpl
from lmserve.core.native_heap import give_back_free_heap, heap_bytes_in_use
from lmserve.core.structured_output import (GRAMMAR_CACHE_BYTES, GRAMMAR_CACHE_SIZE, LOGGED_ERROR_CHARS, MiB,
                                            GrammarCache, GrammarKind, GrammarTooComplexError, OutputGrammar)
from lmserve.core.types import InvalidRequestError

try:
    import llguidance
except ImportError:  # the grammar engine is optional: without it the hook offers none
    llguidance = None

if TYPE_CHECKING:  # annotations only
    import numpy as np

    from lmserve.core.tokenizer import Tokenizer

#: JSON as models write it, spaced like ``json.dumps``, and no other whitespace:
#: a small model cannot wander into endless newlines inside a constrained object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

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
#: Evicting this much at once (or refusing a grammar over the limits) hands the
#: free heap back to the operating system.
TRIM_AFTER_EVICTING_BYTES = 16 * MiB
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


@hookimpl(trylast=True)
def lmserve_grammar_compiler(tokenizer: Tokenizer) -> LLGuidanceCompiler | None:
    """llguidance's compiler over ``tokenizer``; None where llguidance is not installed."""
    if llguidance is None:
        logger.warning("llguidance is not installed: the built-in grammar engine is off.")
        return None
    return LLGuidanceCompiler(tokenizer)


class LLGuidanceConstraint:
    """A :class:`~lmserve.core.structured_output.TokenConstraint` over an llguidance matcher.

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


class LLGuidanceCompiler:
    """The built-in :class:`~lmserve.core.structured_output.GrammarCompiler`:
    compiles :class:`OutputGrammar` s over one tokenizer's vocabulary with llguidance,
    within :data:`GRAMMAR_LIMITS`, and caches them; thread-safe (compiling runs off
    the event loop).

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

    def constraint(self, grammar: OutputGrammar) -> LLGuidanceConstraint:
        """A fresh constraint for one generation; :class:`InvalidRequestError`
        (``param`` ``response_format``) when the grammar is invalid, and its
        subclass :class:`GrammarTooComplexError` when it is over the limits."""
        return LLGuidanceConstraint(self._compile(grammar).deep_copy(), grammar, self.forget)

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
    (:class:`LLGuidanceConstraint`)."""
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
    return llguidance.LLParserLimits(**GRAMMAR_LIMITS)


def llguidance_tokenizer(tokenizer: Tokenizer):
    """llguidance's tokenizer over ``tokenizer``'s vocabulary (special tokens
    marked with a leading 0xFF byte, as llguidance expects; EOS ends a match)."""
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
