"""Byte-level BPE tokenization on tiktoken; the model's files are read by plugins.

The vocabulary, merges and special tokens come from the model's files, read by
a tokenizer loader (:hook:`lmserve_load_tokenizer`; the built-in reads GGUF
metadata and ``tokenizer.json``, ``lmserve.plugins.tokenizer_files``); this
module reads no file format. The BPE itself runs in tiktoken. tiktoken ranks a
token by merge priority and returns that rank as the id, so :class:`Tokenizer`
computes ranks from the merge order and, when they agree with the ids (the
usual case), hands tiktoken's output back untouched; otherwise it translates
ranks to ids with one array lookup.

Added tokens (special ones such as ``<|im_end|>`` and plain added ones) are
matched literally in the text first, the way HF tokenizers do by default; the
text between them goes through the pre-tokenizer regex and BPE.

SentencePiece-style BPE (``▁`` for spaces, byte fallback: Llama 2, Gemma...)
is :class:`~lmserve.core.sentencepiece_bpe.SentencePieceTokenizer`, a subclass
that shares the vocabulary, added tokens and decoding kept here.

Imports only the standard library, numpy and tiktoken.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tiktoken

# Pre-tokenizer regexes, spelled as the HF tokenizers that define them.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's regex after a `Digits(individual_digits=True)` split: every digit
# stands alone, and a digit ends a whitespace run the way the end of text does.
GPT2_DIGITS_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


#: Where text between added tokens stands (:meth:`Tokenizer._encode_segment`).
TEXT_START = "text start"
AFTER_ADDED_TOKEN = "after an added token"
INSIDE_TEXT = "inside a text"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_UNSPELL = str.maketrans({c: chr(b) for c, b in _CHAR_TO_BYTE.items()})
#: The characters byte-level tokens are spelled in (a token spelled otherwise is no byte-level token).
BYTE_LEVEL_ALPHABET = frozenset(_CHAR_TO_BYTE)


def spelled_to_bytes(token: str) -> bytes:
    """The bytes of a byte-level token string (``"Ġthe"`` -> ``b" the"``).

    A character outside GPT-2's alphabet stands for its own UTF-8 bytes, as in
    HF's ByteLevel decoder.
    """
    if BYTE_LEVEL_ALPHABET.issuperset(token):
        return token.translate(_UNSPELL).encode("latin-1")
    return b"".join(
        bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else c.encode("utf-8") for c in token
    )


def bytes_to_spelled(data: bytes) -> str:
    """The byte-level spelling of ``data`` (``b" the"`` -> ``"Ġthe"``)."""
    return "".join(_BYTE_TO_CHAR[b] for b in data)


@dataclass(frozen=True)
class AddedToken:
    """A token matched literally in the text before BPE runs.

    ``lstrip``/``rstrip`` make the match swallow the whitespace on that side,
    as in HF's ``AddedToken``.
    """

    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


class Tokenizer:
    """A byte-level BPE tokenizer: text <-> token ids, plus the model's chat template.

    Tokenizer loaders build one from a model's files (the built-ins:
    ``lmserve.plugins.tokenizer_files``). Encoding matches HF ``tokenizers`` id for id on
    byte-level BPE vocabularies; decoding joins token bytes and decodes UTF-8
    with ``errors="replace"``.
    """

    def __init__(
        self,
        tokens: Sequence[str | None],
        merges: Iterable[tuple[str, str]],
        added_tokens: Iterable[AddedToken] = (),
        pattern: str = GPT2_PATTERN,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        normalizer: Callable[[str], str] | None = None,
        name: str = "lmserve",
    ):
        """
        :param tokens: the BPE vocabulary by id, byte-level spelled (``None`` for a gap).
        :param merges: merge pairs, highest priority first, byte-level spelled.
        :param added_tokens: tokens matched literally; they override ``tokens`` at their id.
        :param pattern: the pre-tokenizer regex (tiktoken / Rust regex syntax).
        :param normalizer: applied to the text between added tokens before BPE.
        """
        self.pattern = pattern
        self._normalizer = normalizer
        # The BPE vocabulary keeps every token (HF's BPE model does too);
        # an added token overrides how its id reads and decodes.
        pieces = [spelled_to_bytes(token) if token is not None else None for token in tokens]
        self._init_vocabulary(
            tokens, pieces, added_tokens, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            add_bos_token=add_bos_token, chat_template=chat_template,
        )
        pieces += [None] * (self.vocab_size - len(pieces))

        ranks, rank_to_id, identity = _bpe_ranks(pieces, list(merges))
        # With rank == id, tiktoken's output is the answer unless it holds a
        # byte the vocabulary lacks (ranked at len(pieces) and up).
        self._rank_to_id = rank_to_id
        self._identity_limit = len(pieces) if identity else -1
        self._identity_exact = identity and len(rank_to_id) == len(pieces)
        try:
            self._encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        except ValueError as error:  # the regex does not compile in tiktoken's engine
            raise ValueError(f"Unsupported pre-tokenizer regex {pattern!r}: {error}") from error

    def _init_vocabulary(
        self,
        tokens: Sequence[str | None],
        token_bytes: Sequence[bytes | None],
        added_tokens: Iterable[AddedToken],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        """What every tokenizer here has besides its BPE: ids <-> token strings and
        bytes, the added tokens and their regex, BOS/EOS and the chat template.

        :param tokens: the vocabulary by id as HF spells it (``None`` for a gap).
        :param token_bytes: the bytes each of ``tokens`` decodes to.
        """
        added = {token.id: token for token in added_tokens}
        self.vocab_size = max(len(tokens), max(added, default=-1) + 1)
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        padding = self.vocab_size - len(tokens)
        self._id_to_token = [token or "" for token in tokens] + [""] * padding
        self._id_to_bytes = [piece or b"" for piece in token_bytes] + [b""] * padding
        for i, token in added.items():
            self._id_to_token[i] = token.content
            self._id_to_bytes[i] = token.content.encode("utf-8")
        self._token_to_id = {token: i for i, token in reversed(list(enumerate(self._id_to_token))) if token}

        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self.bos_token_id = bos_token_id if bos_token_id in range(self.vocab_size) else None
        self.eos_token_id = eos_token_id if eos_token_id in range(self.vocab_size) else None
        self.bos_token = self._id_to_token[self.bos_token_id] if self.bos_token_id is not None else None
        self.eos_token = self._id_to_token[self.eos_token_id] if self.eos_token_id is not None else None

        self._added_ids = {token.content: i for i, token in added.items()}
        self._added_re = _added_tokens_regex(added.values())

    # --- encoding and decoding ----------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, *, starts_text: bool = True) -> list[int]:
        """Token ids for ``text``; added tokens written in it are encoded as themselves.

        :param add_bos: prepend the BOS token; ``None`` means :attr:`add_bos_token`.
        :param starts_text: ``text`` begins a text. ``False``: it continues one (a
            fragment of a prompt, bytes a grammar forces), so a SentencePiece
            tokenizer puts no space in front of it; byte-level BPE does not care.
        """
        if add_bos is None:
            add_bos = self.add_bos_token
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        first = TEXT_START if starts_text else INSIDE_TEXT
        if self._added_re is None:
            ids += self._encode_segment(text, first)
            return ids
        start = 0
        for match in self._added_re.finditer(text):
            if match.start() > start:
                ids += self._encode_segment(text[start : match.start()], first if start == 0 else AFTER_ADDED_TOKEN)
            ids.append(self._added_ids[match.group(match.lastgroup or 0)])
            start = match.end()
        if start < len(text):
            ids += self._encode_segment(text[start:], first if start == 0 else AFTER_ADDED_TOKEN)
        return ids

    def encode_plain(self, text: str, *, starts_text: bool = True) -> list[int]:
        """Token ids for ``text`` as plain text: added tokens written in it are not
        matched (``<|im_start|>`` is ``<``, ``|``, ``im``, ...). No BOS.
        ``starts_text`` as in :meth:`encode`."""
        return self._encode_segment(text, TEXT_START if starts_text else INSIDE_TEXT)

    def _encode_segment(self, text: str, position: str) -> list[int]:
        """Token ids for text between added tokens. ``position``: where the text
        stands, :data:`TEXT_START`, :data:`AFTER_ADDED_TOKEN` or :data:`INSIDE_TEXT`
        (byte-level BPE does not care; a SentencePiece tokenizer may put a space
        in front)."""
        return self._encode_ordinary(text)

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._normalizer is not None:
            text = self._normalizer(text)
        ranks = self._encoding.encode_ordinary(text)
        if self._identity_exact or not ranks or max(ranks) < self._identity_limit:
            return ranks
        ids = self._rank_to_id[np.asarray(ranks, dtype=np.int64)]
        return ids[ids >= 0].tolist()

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False, starts_text: bool = False) -> bytes:
        """The concatenated bytes of ``ids``; ids outside the vocabulary give none.

        These are the bytes the tokens add to the text before them. ``starts_text``:
        the tokens begin a text, so the space a SentencePiece tokenizer's encoder
        put in front of it is dropped (:meth:`decode` does); byte-level BPE has none.
        """
        if skip_special_tokens:
            special = self.special_token_ids
            ids = [i for i in ids if i not in special]
        table = self._id_to_bytes
        try:
            return b"".join([table[i] for i in ids])
        except IndexError:
            n = len(table)
            return b"".join([table[i] for i in ids if 0 <= i < n])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``, a whole text (invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids, skip_special_tokens, starts_text=True).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (an added token's UTF-8 content)."""
        return self._id_to_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The token as HF spells it (``"Ġthe"``, ``"<|im_end|>"``)."""
        return self._id_to_token[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of an HF-spelled token, or ``None``."""
        return self._token_to_id.get(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token={self.bos_token!r}, "
            f"eos_token={self.eos_token!r}, add_bos_token={self.add_bos_token})"
        )


def _bpe_ranks(pieces: list[bytes | None], merges: list[tuple[str, str]]) -> tuple[dict[bytes, int], np.ndarray, bool]:
    """tiktoken's ``mergeable_ranks`` for a vocabulary, a rank -> id table, and whether rank == id.

    Only single bytes and tokens some usable merge produces get a rank; any
    other vocabulary token is never produced by BPE (it stays decodable). A
    merged token ranks by its first merge. Bytes missing from the vocabulary
    get ranks past the vocabulary that map to -1 (dropped, as HF drops them).
    """
    byte_ids: dict[bytes, int] = {}
    bytes_to_id: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        if piece is not None:
            bytes_to_id.setdefault(piece, i)
            if len(piece) == 1:
                byte_ids.setdefault(piece, i)

    # Merges are spelled like the vocabulary; resolve them to bytes once.
    resolved = []
    for index, (left, right) in enumerate(merges):
        a, b = spelled_to_bytes(left), spelled_to_bytes(right)
        if a + b in bytes_to_id:
            resolved.append((index, a, b))
    # A merge is usable once both halves are reachable. Merges normally follow
    # the merges that make their halves, so this loop runs once or twice.
    reachable = set(byte_ids)
    first_merge: dict[bytes, int] = {}
    pending = resolved
    while pending:
        waiting = []
        for index, a, b in pending:
            if a in reachable and b in reachable:
                merged = a + b
                if index < first_merge.get(merged, len(merges)):
                    first_merge[merged] = index
                reachable.add(merged)
            else:
                waiting.append((index, a, b))
        if len(waiting) == len(pending):
            break
        pending = waiting

    merged_tokens = sorted(first_merge, key=first_merge.__getitem__)
    merged_ids = [bytes_to_id[t] for t in merged_tokens]
    identity = all(a < b for a, b in zip(merged_ids, merged_ids[1:]))
    missing = [bytes((b,)) for b in range(256) if bytes((b,)) not in byte_ids]
    if identity:
        ranks = {**byte_ids, **dict(zip(merged_tokens, merged_ids))}
        base = len(pieces)
        rank_to_id = np.concatenate([np.arange(base, dtype=np.int64), np.full(len(missing), -1, np.int64)])
    else:
        singles = sorted(byte_ids)
        ordered = singles + merged_tokens
        ranks = {t: r for r, t in enumerate(ordered)}
        base = len(ordered)
        rank_to_id = np.array([bytes_to_id[t] for t in ordered] + [-1] * len(missing), dtype=np.int64)
    ranks.update((t, base + k) for k, t in enumerate(missing))
    return ranks, rank_to_id, identity


def _added_tokens_regex(added: Iterable[AddedToken]) -> re.Pattern[str] | None:
    """One regex matching any added token, longest first; stripping tokens get a named group."""
    alternatives = []
    for token in sorted(added, key=lambda t: (-len(t.content), t.content)):
        if not token.content:
            continue
        body = re.escape(token.content)
        if token.lstrip or token.rstrip:
            body = (
                (r"\s*" if token.lstrip else "")
                + f"(?P<t{token.id}>{body})"
                + (r"\s*" if token.rstrip else "")
            )
        alternatives.append(body)
    return re.compile("|".join(alternatives)) if alternatives else None
