"""The interface chat-template plugins provide."""

from __future__ import annotations

from typing import Protocol, Sequence, TypedDict, runtime_checkable


class Message(TypedDict):
    role: str
    content: str


@runtime_checkable
class ChatTemplate(Protocol):
    """Renders OpenAI-style messages into the prompt text a model expects."""

    #: A short name shown in logs and ``lmserve templates``.
    name: str
    #: Strings that end the assistant's turn (become stop criteria).
    stop_words: Sequence[str]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``, ending with the assistant's header
        when ``add_generation_prompt``. Raises ``InvalidRequestError`` for
        messages the template refuses."""
        ...
