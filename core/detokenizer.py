"""Incremental detokenization: token ids in, text deltas out, one request at a time.

A character may span tokens (byte-level BPE splits emoji and CJK into bytes,
SentencePiece vocabularies fall back to byte tokens ``<0xE6>``...), so the bytes
of an incomplete UTF-8 character are held back until the rest arrives; nothing
is re-decoded. Each push costs O(new tokens).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve.core.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text as they arrive.

    Call :meth:`push` with each batch of new token ids and send on the text it
    returns (it may be ``""`` while a character is incomplete); call
    :meth:`flush` once the request finishes. Concatenated, the deltas equal
    the text the tokens add to the text before them (a prompt, as a rule),
    ``tokenizer.decode_bytes(token_ids, skip_special_tokens)`` read as UTF-8.

    That is ``tokenizer.decode(token_ids, skip_special_tokens)`` unless the tokens
    begin a text: then a SentencePiece tokenizer's ``decode`` drops the space its
    encoder put in front of the text (``"▁Hello"`` reads ``"Hello"``), which a
    continuation keeps (``" Hello"``, as vLLM and llama.cpp's server stream it).
    ``starts_text=True`` drops it here too, so the deltas equal ``decode``'s text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, starts_text: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._at_text_start = starts_text
        self.token_ids: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add new tokens; return the text they complete.

        Never ends inside a UTF-8 character: the bytes of a character still
        missing its tail are held until a later push or :meth:`flush`. Bytes
        that can never be valid UTF-8 become U+FFFD right away.
        """
        new_ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_ids.extend(new_ids)
        data = self.tokenizer.decode_bytes(new_ids, self.skip_special_tokens)
        if self._at_text_start and data:  # these tokens hold the text's first token
            data = self.tokenizer.decode_bytes(new_ids, self.skip_special_tokens, starts_text=True)
            self._at_text_start = False
        delta = self._decoder.decode(data)
        if delta:
            self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Return whatever is held back, at the end of the request (an incomplete character becomes U+FFFD)."""
        delta = self._decoder.decode(b"", final=True)
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def num_held_bytes(self) -> int:
        """Bytes of an incomplete character waiting for the rest of it."""
        return len(self._decoder.getstate()[0])

    @property
    def text(self) -> str:
        """All text returned so far (joined on access; cheap to read once at the end)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""
