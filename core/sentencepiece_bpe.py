"""SentencePiece-style BPE: the tokenizers of Llama 2, Mistral, Mixtral, Phi-3 and Gemma.

These vocabularies spell a space as ``▁`` (U+2581) and hold one token per byte,
``<0x00>`` to ``<0xFF>``, for characters the vocabulary lacks ("byte fallback").
There is no byte-level alphabet and no pre-tokenizer regex: the text between
added tokens has its spaces written as ``▁`` (and maybe a ``▁`` put in front,
sentencepiece's "dummy prefix"), then BPE merges adjacent pieces, best first,
until no merge applies; a character no token covers becomes its UTF-8 bytes'
tokens. "Best" is the merge's rank in ``tokenizer.json`` (HF ``tokenizers``'
BPE model) or, in GGUF files, which carry no merges, the score of the merged
token (llama.cpp's ``llm_tokenizer_spm``); ties go to the leftmost pair.

The merge runs in Python, per chunk of text that no token can span (the text is
cut before a ``▁`` whose left neighbour never precedes ``▁`` inside a token),
and chunks are cached, so the usual cost is one dictionary lookup per word.

Decoding writes ``▁`` as a space and byte tokens as their byte; a whole text
(:meth:`SentencePieceTokenizer.decode`) also drops the space the dummy prefix
put in front of it, as HF's decoder does, while :meth:`decode_bytes` of tokens
that continue a text keeps it. Bytes that are no UTF-8 read as U+FFFD the way
Python's ``errors="replace"`` has it (as for byte-level BPE, and as streaming
can), where HF's ``ByteFallback`` decoder makes every byte of such a run of
byte tokens U+FFFD; valid text decodes the same.

Imports only the standard library.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from lmserve.core.tokenizer import AFTER_ADDED_TOKEN, TEXT_START, AddedToken, Tokenizer

#: How SentencePiece writes a space.
SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_PREFIXES = ("never", "first", "always")
#: How a whole text's first token is decoded: "keep" it; "strip" one leading space
#: (HF's ``Strip`` decoder, llama.cpp with ``add_space_prefix``); "drop_spaces": drop
#: every ``▁`` of the first token (HF's ``Metaspace`` decoder).
LEADING_SPACE_DECODINGS = ("keep", "strip", "drop_spaces")
_CACHE_LIMIT = 65536
_CACHED_CHUNK_LENGTH = 128


def byte_token_value(token: str) -> int | None:
    """The byte a ``<0xNN>`` token stands for, or ``None`` for any other token."""
    match = _BYTE_TOKEN.fullmatch(token)
    return int(match.group(1), 16) if match else None


def piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece token decodes to (``"▁the"`` -> ``b" the"``, ``"<0x0A>"`` -> ``b"\\n"``)."""
    value = byte_token_value(piece)
    if value is not None:
        return bytes((value,))
    return piece.replace(SPACE, " ").encode("utf-8")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece-style BPE tokenizer with :class:`Tokenizer`'s interface.

    Built by the tokenizer loaders from ``tokenizer.json`` (``merges``) or GGUF
    metadata (``scores``); give exactly one of the two.
    """

    def __init__(
        self,
        pieces: Sequence[str | None],
        added_tokens: Iterable[AddedToken] = (),
        *,
        merges: Iterable[tuple[str, str]] | None = None,
        scores: Mapping[int, float] | None = None,
        space_prefix: str = "never",
        prefix_spaced_text: bool = True,
        split_at_spaces: bool = False,
        leading_space_decoding: str = "keep",
        unk_token_id: int | None = None,
        byte_fallback: bool = True,
        fuse_unk: bool = True,
        ignore_merges: bool = False,
        normalizer: Callable[[str], str] | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ):
        """
        :param pieces: the vocabulary by id, spelled with ``▁`` (``None`` for a gap).
        :param added_tokens: tokens matched literally; they override ``pieces`` at their id.
        :param merges: merge pairs, highest priority first (``tokenizer.json``).
        :param scores: id -> score of the tokens merges may make; the higher the
            score, the earlier the merge (GGUF, as llama.cpp does).
        :param space_prefix: which text between added tokens gets a ``▁`` in front:
            "never", "first" (only the text at the very start) or "always" (that and
            the text after each added token). Text that continues a text gets none.
        :param prefix_spaced_text: prefix text that already starts with a space too
            (sentencepiece, llama.cpp, HF's ``Prepend`` normalizer; HF's ``Metaspace``
            pre-tokenizer does not).
        :param split_at_spaces: cut the text before every ``▁`` before BPE (HF's
            ``Metaspace`` with ``split``), so no token spans two words.
        :param leading_space_decoding: one of :data:`LEADING_SPACE_DECODINGS`.
        :param normalizer: applied to the text between added tokens before its spaces become ``▁``.
        """
        _check_options(merges, scores, space_prefix, leading_space_decoding)
        self.pattern = None
        self._normalizer = normalizer
        self._space_prefix = space_prefix
        self._prefix_spaced_text = prefix_spaced_text
        self._split_at_spaces = split_at_spaces
        self._leading_space_decoding = leading_space_decoding
        self._ignore_merges = ignore_merges
        self._fuse_unk = fuse_unk
        token_bytes = [piece_bytes(piece) if piece is not None else None for piece in pieces]
        self._init_vocabulary(pieces, token_bytes, added_tokens, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, add_bos_token=add_bos_token, chat_template=chat_template)
        self._piece_ids = _piece_ids(pieces)
        self._unk_id = unk_token_id if unk_token_id in range(self.vocab_size) else None
        self._byte_ids = _byte_ids(self._piece_ids) if byte_fallback else None
        # Pair ranks (tokenizer.json) or merged-token ranks (GGUF scores): lower merges first.
        self._pair_ranks, self._token_ranks, made = _merge_ranks(pieces, self._piece_ids, merges, scores)
        self._safe_cuts = _safe_cuts_regex(made)
        self._cache: dict[str, list[int]] = {}

    # --- encoding ------------------------------------------------------------

    def _encode_segment(self, text: str, position: str) -> list[int]:
        if not text:
            return []
        if self._normalizer is not None:
            text = self._normalizer(text)
        text = text.replace(" ", SPACE)
        prefixed = (self._space_prefix != "never" if position == TEXT_START
                    else position == AFTER_ADDED_TOKEN and self._space_prefix == "always")
        if prefixed and (self._prefix_spaced_text or not text.startswith(SPACE)):
            text = SPACE + text
        if self._split_at_spaces:
            chunks = re.findall(f"[^{SPACE}]+|{SPACE}[^{SPACE}]*", text)
        else:
            chunks = self._safe_cuts.split(text) if self._safe_cuts is not None else [text]
        cache = self._cache
        ids: list[int] = []
        for chunk in chunks:
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._bpe(chunk)
                if len(chunk) <= _CACHED_CHUNK_LENGTH:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[chunk] = chunk_ids
            ids += chunk_ids
        return ids

    def _bpe(self, chunk: str) -> list[int]:
        """The ids of one chunk: merge the best adjacent pair until none merges."""
        if not chunk:
            return []
        if self._ignore_merges and chunk in self._piece_ids:
            return [self._piece_ids[chunk]]
        symbols: list[str | None] = list(chunk)
        n = len(symbols)
        following = list(range(1, n + 1))
        preceding = list(range(-1, n - 1))
        pair_ranks, token_ranks = self._pair_ranks, self._token_ranks

        def rank(left: str, right: str):
            if pair_ranks is not None:
                return pair_ranks.get((left, right))
            return token_ranks.get(left + right)

        # (rank, position, left, right): the lowest rank first, then the leftmost.
        queue = []
        for i in range(n - 1):
            r = rank(symbols[i], symbols[i + 1])
            if r is not None:
                queue.append((r, i, symbols[i], symbols[i + 1]))
        heapq.heapify(queue)
        while queue:
            _, i, left, right = heapq.heappop(queue)
            j = following[i]
            # A symbol only grows, so an unchanged pair of texts is still this pair.
            if symbols[i] != left or j >= n or symbols[j] != right:
                continue
            merged = left + right
            symbols[i], symbols[j] = merged, None
            k = following[j]
            following[i] = k
            if k < n:
                preceding[k] = i
                r = rank(merged, symbols[k])
                if r is not None:
                    heapq.heappush(queue, (r, i, merged, symbols[k]))
            p = preceding[i]
            if p >= 0:
                r = rank(symbols[p], merged)
                if r is not None:
                    heapq.heappush(queue, (r, p, symbols[p], merged))
        return self._symbol_ids([s for s in symbols if s is not None])

    def _symbol_ids(self, symbols: list[str]) -> list[int]:
        """Ids of the merged symbols; a character no token covers falls back to its bytes' tokens."""
        ids: list[int] = []
        piece_ids = self._piece_ids
        for symbol in symbols:
            token_id = piece_ids.get(symbol)
            if token_id is not None:
                ids.append(token_id)
            elif self._byte_ids is not None:
                ids += [self._byte_ids[b] for b in symbol.encode("utf-8")]
            elif self._unk_id is not None and not (self._fuse_unk and ids and ids[-1] == self._unk_id):
                ids.append(self._unk_id)
        return ids

    # --- decoding ------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False, starts_text: bool = False) -> bytes:
        if not starts_text or self._leading_space_decoding == "keep":
            return super().decode_bytes(ids, skip_special_tokens)
        n, special, table = self.vocab_size, self.special_token_ids, self._id_to_bytes
        ids = [i for i in ids if 0 <= i < n and not (skip_special_tokens and i in special)]
        for k, token_id in enumerate(ids):
            if table[token_id]:  # the first token that writes anything
                return self._text_start_bytes(token_id) + b"".join([table[i] for i in ids[k + 1 :]])
        return b""

    def _text_start_bytes(self, token_id: int) -> bytes:
        """The bytes of ``token_id`` as the first token of a text."""
        data = self._id_to_bytes[token_id]
        if self._leading_space_decoding == "strip":
            return data[1:] if data.startswith(b" ") else data
        token = self._id_to_token[token_id]
        return data if byte_token_value(token) is not None else token.replace(SPACE, "").encode("utf-8")

    def __repr__(self) -> str:
        return "SentencePiece" + super().__repr__()


def _check_options(merges, scores, space_prefix: str, leading_space_decoding: str) -> None:
    """Refuse a tokenizer given both or neither of merges and scores, or an unknown option."""
    if (merges is None) == (scores is None):
        raise ValueError("Give a SentencePiece tokenizer either merges or scores.")
    if space_prefix not in _SPACE_PREFIXES:
        raise ValueError(f"space_prefix must be one of {_SPACE_PREFIXES}, not {space_prefix!r}")
    if leading_space_decoding not in LEADING_SPACE_DECODINGS:
        raise ValueError(f"leading_space_decoding must be one of {LEADING_SPACE_DECODINGS}")


def _piece_ids(pieces: Sequence[str | None]) -> dict[str, int]:
    """Each piece's id; a piece listed twice keeps its first id."""
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece is not None:
            ids.setdefault(piece, i)
    return ids


def _byte_ids(piece_ids: Mapping[str, int]) -> list[int] | None:
    """The ids of the 256 byte tokens ``<0x00>``..``<0xFF>``, by byte value; None
    when the vocabulary lacks one of them (there is then no byte fallback)."""
    byte_ids = [piece_ids.get(f"<0x{b:02X}>") for b in range(256)]
    return byte_ids if all(i is not None for i in byte_ids) else None


def _merge_ranks(pieces: Sequence[str | None], piece_ids: Mapping[str, int],
                 merges: Iterable[tuple[str, str]] | None, scores: Mapping[int, float] | None,
                 ) -> tuple[dict[tuple[str, str], int] | None, dict[str, float] | None, set[str]]:
    """What orders the merges, lower first, and the tokens merges can make.

    From ``merges`` (tokenizer.json): each pair's rank, kept only for pairs of
    known pieces that make a known piece. From ``scores`` (GGUF): each
    multi-character token's negated score. Returns ``(pair_ranks, None, made)``
    or ``(None, token_ranks, made)``.
    """
    if merges is not None:
        pair_ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right) in enumerate(merges):
            if left in piece_ids and right in piece_ids and left + right in piece_ids:
                pair_ranks.setdefault((left, right), rank)
        return pair_ranks, None, {left + right for left, right in pair_ranks}
    token_ranks: dict[str, float] = {}
    for i, score in scores.items():
        piece = pieces[i] if 0 <= i < len(pieces) else None
        if piece is not None and len(piece) > 1:
            token_ranks.setdefault(piece, -float(score))
    return None, token_ranks, set(token_ranks)


def _safe_cuts_regex(made: Iterable[str]) -> re.Pattern[str] | None:
    """Where a text may be cut before BPE without changing its tokens: before a
    ``▁`` whose left neighbour never precedes ``▁`` inside a token merges can make
    (no merge can then join the two sides). ``None``: nowhere."""
    before_space = {piece[k - 1] for piece in made for k in range(1, len(piece)) if piece[k] == SPACE}
    if not before_space:
        return re.compile(f"(?={SPACE})")
    if len(before_space) > 4096:
        return None
    chars = "".join(re.escape(c) for c in sorted(before_space))
    return re.compile(f"(?<![{chars}])(?={SPACE})")
