"""Structured outputs: a response format turned into a grammar that constrains
generation token by token.

A request's format (:class:`OutputGrammar`: a JSON schema, any JSON object, or a
regular expression) is compiled by a :class:`GrammarCompiler` over the model's
own vocabulary, once per distinct format (cached, e.g. in a :class:`GrammarCache`);
each generation then gets its own :class:`TokenConstraint`, a cheap copy of the
compiled grammar that follows that generation's tokens.

The grammar engine is a plugin: the compiler comes from the
:hook:`lmserve_grammar_compiler` hook (the built-in one, over llguidance, is
``lmserve.plugins.llguidance_grammar``), and this module holds only the
interfaces, so the kernel is tied to no grammar library. A server without a
grammar engine serves free text, and answers a request that needs a grammar
with a 400 (:data:`NO_GRAMMAR_ENGINE`).

The engine asks a constraint three things per step, and nothing else:
which tokens may come next (:meth:`TokenConstraint.fill_bitmask`, one bit per
token, the layout the sampler kernels read), whether the text so far is
complete (:meth:`TokenConstraint.is_accepting`: the end-of-turn tokens are
allowed then), and to follow the token it sampled (:meth:`TokenConstraint.accept`).
The engine stays unaware of grammars; any object with those methods works.

A format comes from a client, and a short one can be costly (``(b{1000}){1000}``
is 15 characters). So a compiler works within limits on the work and memory of
one grammar, a format over them is a :class:`GrammarTooComplexError` (a 400) that
says which limit, never the engine's internal state, and its cache of compiled
grammars is bounded by their bytes as well as their number (:class:`GrammarCache`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from lmserve.core.types import InvalidRequestError

if TYPE_CHECKING:  # annotations only
    import numpy as np

GrammarKind = Literal["json_schema", "regex"]

#: Any JSON object (``response_format: {"type": "json_object"}``).
ANY_JSON_OBJECT = '{"type": "object"}'

MiB = 1024 * 1024
#: A compiler's cache of compiled grammars (:class:`GrammarCache`): at most this many...
GRAMMAR_CACHE_SIZE = 256
#: ...and at most this many bytes, by the compiler's estimate.
GRAMMAR_CACHE_BYTES = 256 * MiB
#: How much of an unexpected grammar engine error goes to the server's log.
LOGGED_ERROR_CHARS = 500
#: What a request that needs a grammar is told where no plugin offers a grammar
#: engine (after the name of the parameter that asked for the grammar).
NO_GRAMMAR_ENGINE = ("this server has no grammar engine (no plugin implements lmserve_grammar_compiler), "
                     "so it cannot constrain the output")


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
    def error(self) -> str | None:
        """Why the last token was refused, in a sentence fit for a client; None
        while every token was allowed."""

    @property
    def grammar(self) -> OutputGrammar | None:
        """What the constraint was compiled from (None where it was not made from
        one): a backend in another process compiles its own constraint from it,
        since a constraint does not cross processes."""


class GrammarCache:
    """Compiled grammars by format, bounded both by their number and by their
    estimated bytes; the least recently used go first. Thread-safe.

    The byte bound is what matters: one compiled grammar may take 40 KB or tens
    of MB. A value larger than the whole budget is not kept at all (its request
    still uses it). Sizes are whatever the caller estimates
    (the llguidance plugin charges what the C heap grew by across a compile)."""

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
    """A format over the grammar engine's limits (the work, memory or size one
    grammar may take); a 400 that names the limit."""


@runtime_checkable
class GrammarCompiler(Protocol):
    """Compiles :class:`OutputGrammar` s over one tokenizer's vocabulary: what a
    plugin of :hook:`lmserve_grammar_compiler` returns, one per server (or Ray
    replica). Thread-safe: the frontends compile a new grammar in a worker thread,
    off the event loop, while other requests take constraints of known ones."""

    def constraint(self, grammar: OutputGrammar) -> TokenConstraint:
        """A fresh constraint for one generation (it is stateful: never shared).

        Raises :class:`~lmserve.core.types.InvalidRequestError` with ``param``
        ``response_format`` and a message that starts with ``response_format:``
        for a grammar the engine refuses (the frontends put the parameter that
        asked for it, ``response_format`` or ``tools``, in its place), and its
        subclass :class:`GrammarTooComplexError` for one over the engine's limits.
        Anything else it raises is logged and answered as a 400 all the same: the
        client's grammar is all that varies."""

    def is_compiled(self, grammar: OutputGrammar) -> bool:
        """Whether :meth:`constraint` would find ``grammar`` compiled already
        (then it is cheap enough for the event loop)."""
