"""A chat request's prompt as token ids: the template's rendering, with the
messages' text as data (:mod:`lmserve.core.message_text`) unless the server
runs with ``--special-tokens-in-messages``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from lmserve.core.message_text import message_text_encoder
from lmserve.frontends.http.state import ServerState

logger = logging.getLogger(__name__)
_warned = False


def chat_prompt_ids(state: ServerState, messages: Sequence[dict], render: Callable[[list[dict]], str]) -> list[int]:
    """The ids of ``render(messages)``; special tokens typed in the messages are plain text."""
    tokenizer = state.tokenizer
    as_data = not state.config.options.get("special_tokens_in_messages")
    if as_data and not hasattr(tokenizer, "encode_plain"):
        _warn_once(tokenizer)
        as_data = False
    if not as_data:
        return tokenizer.encode(render(list(messages)), add_bos=False)
    return message_text_encoder(tokenizer).encode(messages, render)


def _warn_once(tokenizer) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("The tokenizer %s has no encode_plain(text): special tokens typed in messages are "
                       "tokenized as control tokens.", type(tokenizer).__name__)
