"""Log-probabilities in OpenAI's two shapes: chat's ``content`` list and completions' columns."""

from __future__ import annotations

import codecs
from typing import Sequence

from lmserve.core.types import TokenLogprob


class LogprobsFormatter:
    """Turns engine :class:`TokenLogprob` records into response JSON."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        #: As the detokenizer: special tokens then have no text (offsets count 0 characters).
        self.skip_special_tokens = skip_special_tokens

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """The token's text and bytes. A token that is not valid UTF-8 on its own
        (part of a character) is named ``bytes:\\xe4...`` as OpenAI does, so
        distinct tokens never share a name."""
        try:
            data = self.tokenizer.token_bytes(token_id)
        except IndexError:  # a padded embedding row past the tokenizer's vocabulary
            data = b""
        try:
            return data.decode("utf-8"), list(data)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data), list(data)

    def chat(self, logprobs: Sequence[TokenLogprob]) -> dict:
        """``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        content = []
        for item in logprobs:
            token, data = self._token(item.token_id)
            top = []
            for token_id, logprob in item.top:
                alt, alt_data = self._token(token_id)
                top.append({"token": alt, "logprob": logprob, "bytes": alt_data})
            content.append({"token": token, "logprob": item.logprob, "bytes": data, "top_logprobs": top})
        return {"content": content}

    def completion_prompt(self, prompt_ids: Sequence[int], records: Sequence[TokenLogprob | None]) -> dict:
        """Columns for an echoed prompt: the first token has no logprob and no alternatives (None)."""
        filled = [record or TokenLogprob(token_id, 0.0) for token_id, record in zip(prompt_ids, records)]
        columns = self.completion(filled, 0)
        if columns["tokens"]:
            columns["token_logprobs"][0] = None
            columns["top_logprobs"][0] = None
        return columns

    def completion(self, logprobs: Sequence[TokenLogprob], text_offset: int) -> dict:
        """``{tokens, token_logprobs, top_logprobs, text_offset}``; offsets start at
        ``text_offset`` (the length of the choice's text before these tokens)."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for item in logprobs:
            token, data = self._token(item.token_id)
            tokens.append(token)
            token_logprobs.append(item.logprob)
            # The top alternatives and, as vLLM, the sampled token.
            top = {self._token(token_id)[0]: logprob for token_id, logprob in item.top}
            tops.append({**top, token: item.logprob})
            if self.skip_special_tokens and self.tokenizer.is_special(item.token_id):
                offsets.append(text_offset)
                continue
            offsets.append(text_offset + _chars_owed(decoder.getstate()[0], data))
            text_offset += len(decoder.decode(bytes(data)))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chars_owed(pending: bytes, data: list[int]) -> int:
    """Characters of the text that belong before a token although the decoder
    has not emitted them yet: bytes left pending by earlier tokens that this
    token does not continue (a character cut short) become U+FFFD first. A
    token that continues a pending character starts where that character does.
    """
    if not pending or not data or data[0] & 0xC0 == 0x80:
        return 0
    return len(pending.decode("utf-8", errors="replace"))
