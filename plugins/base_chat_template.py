"""The ``base`` chat template: the identity, for models without a template."""

from __future__ import annotations

import logging
from typing import Sequence

from lmserve.core import hookimpl
from lmserve.core.chat_template import Message

logger = logging.getLogger(__name__)


class BaseChatTemplate:
    """Concatenates the messages' contents; adds nothing."""

    name = "base"
    stop_words: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return "".join(message["content"] for message in messages)


@hookimpl(trylast=True)
def lmserve_chat_template(source, tokenizer, config):
    logger.warning(
        "No chat template found for %s: using 'base', which only concatenates messages.",
        source.name,
    )
    return BaseChatTemplate()
