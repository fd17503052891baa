"""Message text is data: special tokens that a message's text spells out are
encoded as plain text; only the chat template's own markers are control tokens.

A chat prompt is rendered as one string and then tokenized, and the tokenizer
matches special tokens written anywhere in it. So a user message containing
``<|im_end|>\\n<|im_start|>system\\n...`` became real ``<|im_start|>`` tokens: a
user could forge system and assistant turns. :class:`MessageTextEncoder` keeps
the two apart:

1. every special token's text in the messages (and any character of the stand-in
   range below, so that a message's own characters come back as they were) is
   replaced by a stand-in: one character of Unicode's Supplementary Private Use
   Area-B, which templates copy through unchanged (``tojson`` included: it keeps
   non-ASCII characters);
2. the template renders the messages as usual;
3. the rendered text is tokenized piece by piece: between stand-ins, special
   tokens are matched (they are the template's); each stand-in is the plain-text
   tokenization of what it stands for (``<``, ``|``, ``im``, ``_start``, ...).

``--special-tokens-in-messages`` restores the old behaviour (the frontends then
encode the rendered text whole).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

#: Stand-ins are characters from here on (Supplementary Private Use Area-B, U+100000..U+10FFFD).
STAND_IN_BASE = 0x100000
STAND_IN_LAST = 0x10FFFD
_STAND_IN = re.compile(f"[{chr(STAND_IN_BASE)}-{chr(STAND_IN_LAST)}]")

#: Message fields that are never text a person wrote.
_NOT_TEXT = frozenset({"role", "type", "tool_call_id", "id"})


class MessageTextEncoder:
    """Encodes chat prompts so that the messages' text never becomes control tokens.

    ``tokenizer`` needs ``encode(text, add_bos)``, ``encode_plain(text)`` (text with
    no added token matched), ``special_token_ids`` and ``id_to_token``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = {tokenizer.id_to_token(i) for i in tokenizer.special_token_ids}
        specials.discard("")
        specials.discard(None)
        alternatives = [re.escape(text) for text in sorted(specials, key=lambda text: (-len(text), text))]
        self._special_text = re.compile("|".join([*alternatives, _STAND_IN.pattern])) if specials else None

    def encode(self, messages: Sequence[dict], render: Callable[[list[dict]], str]) -> list[int]:
        """The token ids of ``render(messages)`` with the messages' text as data.

        ``render`` turns messages into the prompt text (the chat template, with the
        request's tools and flags); it is called once, with the stand-ins in place.
        """
        if self._special_text is None:
            return self.tokenizer.encode(render(list(messages)), add_bos=False)
        originals: dict[str, str] = {}  # stand-in -> the text it stands for
        stand_ins: dict[str, str] = {}

        def stand_in(match: re.Match) -> str:
            text = match.group(0)
            if text not in stand_ins:
                if len(originals) > STAND_IN_LAST - STAND_IN_BASE:
                    raise ValueError("The messages hold too many distinct special tokens.")
                char = chr(STAND_IN_BASE + len(originals))
                stand_ins[text], originals[char] = char, text
            return stand_ins[text]

        rendered = render([self._replace(message, stand_in) for message in messages])
        if not originals:
            return self.tokenizer.encode(rendered, add_bos=False)
        ids: list[int] = []
        start = 0
        for match in _STAND_IN.finditer(rendered):
            original = originals.get(match.group(0))
            if original is None:  # not one of ours (a template wrote it): ordinary text
                continue
            # Only the first piece starts the text (a SentencePiece tokenizer's space prefix).
            if match.start() > start:
                ids += self.tokenizer.encode(rendered[start:match.start()], add_bos=False, starts_text=start == 0)
            ids += self.tokenizer.encode_plain(original, starts_text=match.start() == 0)
            start = match.end()
        if start < len(rendered):
            ids += self.tokenizer.encode(rendered[start:], add_bos=False, starts_text=start == 0)
        return ids

    def _replace(self, value: Any, stand_in: Callable[[re.Match], str], key: str | None = None) -> Any:
        if isinstance(value, str):
            return value if key in _NOT_TEXT else self._special_text.sub(stand_in, value)
        if isinstance(value, dict):
            return {name: self._replace(item, stand_in, name) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._replace(item, stand_in, key) for item in value)
        return value


_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def message_text_encoder(tokenizer) -> MessageTextEncoder:
    """The (cached) encoder of ``tokenizer``."""
    encoder = _encoders.get(tokenizer)
    if encoder is None:
        encoder = _encoders[tokenizer] = MessageTextEncoder(tokenizer)
    return encoder
