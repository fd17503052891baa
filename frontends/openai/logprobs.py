"""Log-probabilities in OpenAI's two shapes: chat's ``content`` list and completions' columns."""

from __future__ import annotations

from typing import Sequence

from lmserve.core.types import TokenLogprob


class LogprobsFormatter:
    """Turns engine :class:`TokenLogprob` records into response JSON."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        data = self.tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)

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

    def completion(self, logprobs: Sequence[TokenLogprob], text_offset: int) -> dict:
        """``{tokens, token_logprobs, top_logprobs, text_offset}``; offsets start at
        ``text_offset`` (the length of the choice's text before these tokens)."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for item in logprobs:
            token, _ = self._token(item.token_id)
            tokens.append(token)
            token_logprobs.append(item.logprob)
            tops.append({self._token(token_id)[0]: logprob for token_id, logprob in item.top})
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
