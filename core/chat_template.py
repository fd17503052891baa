"""The interface chat-template plugins provide."""

from __future__ import annotations

from typing import Protocol, Sequence, TypedDict, runtime_checkable


class Message(TypedDict):
    role: str
    content: str


@runtime_checkable
class ChatTemplate(Protocol):
    """Renders OpenAI-style messages into the prompt text a model expects.

    Two methods are optional, looked up with ``getattr``:
    ``render_continuation(messages) -> str``, the text of a later turn of an
    interactive session (see :func:`render_continuation`), and
    ``matches(model_name) -> bool``, whether a model without a chat template
    of its own should get this one (templates contributed through
    :hook:`lmserve_chat_templates` are tried in order; without ``matches`` a
    template is chosen by name only).
    """

    #: A short name shown in logs and ``lmserve templates``.
    name: str
    #: Strings that end the assistant's turn (become stop criteria).
    stop_words: Sequence[str]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``, ending with the assistant's header
        when ``add_generation_prompt``. Raises ``InvalidRequestError`` for
        messages the template refuses."""
        ...


#: Stand in for an earlier exchange when a continuation is rendered
#: (private-use characters: no real message holds them).
_EARLIER_USER = "\ue000lmserve-earlier-question\ue001"
_EARLIER_REPLY = "\ue000lmserve-earlier-reply\ue001"


def render_continuation(template: ChatTemplate, messages: Sequence[Message]) -> str:
    """The text that continues a conversation after an assistant's reply: what
    the template writes after a reply's content (its end-of-turn mark and
    separator), then ``messages``, then the assistant's header. No system
    prompt, no BOS: they are in the conversation already.

    A template may define ``render_continuation(messages)`` itself; otherwise
    it is derived from :meth:`ChatTemplate.render` of an earlier exchange
    followed by ``messages``, which works for every template that renders
    each message in place (the model's own Jinja templates do).
    """
    own = getattr(template, "render_continuation", None)
    if own is not None:
        return own(messages)
    earlier: list[Message] = [{"role": "user", "content": _EARLIER_USER},
                              {"role": "assistant", "content": _EARLIER_REPLY}]
    text = template.render([*earlier, *messages], add_generation_prompt=True)
    at = text.find(_EARLIER_REPLY)
    if at < 0:
        raise ValueError(f"The chat template {template.name!r} drops earlier replies, so it cannot "
                         "continue a conversation.")
    return text[at + len(_EARLIER_REPLY):]
