"""The ``base`` chat template: the identity, for models without a template."""

from __future__ import annotations

from typing import Sequence

from lmserve.core import hookimpl
from lmserve.core.chat_template import Message


class BaseChatTemplate:
    """Concatenates the messages' contents; adds nothing.

    The last resort of the choice (``lmserve.plugins.chat_templates``), and
    ``--chat-template base`` for a model that needs no decoration.
    """

    name = "base"
    stop_words: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return "".join(message["content"] for message in messages)


@hookimpl
def lmserve_chat_templates():
    return [BaseChatTemplate()]
