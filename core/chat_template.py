"""Chat templates: what a template is, and how a conversation is rendered through one.

A :class:`ChatTemplate` turns OpenAI-style messages into the prompt text a model
expects. The server renders every chat request with :func:`render_chat`, which
gives a template the request's tools (or writes them as Hermes text for a
template that takes none), and a later turn of an interactive session with
:func:`render_continuation`.

Templates come from plugins; which one the server uses is chosen at startup
(:mod:`lmserve.core.template_choice`). LMDeploy's templates of fields are in
:mod:`lmserve.core.fields_chat_template`. Like the rest of the kernel, this
module imports only ``lmserve.core`` and the standard library (no Jinja: the
``hf`` template is a plugin's).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, Sequence, TypedDict, runtime_checkable

from lmserve.core.tool_prompts import hermes_messages
from lmserve.core.types import InvalidRequestError


class MessageFunctionCall(TypedDict):
    name: str
    #: The arguments object as JSON text (OpenAI's shape).
    arguments: str


class MessageToolCall(TypedDict):
    """A call an assistant message made: ``{"id", "type": "function", "function"}``."""

    id: str
    type: str
    function: MessageFunctionCall


class _RoleAndContent(TypedDict):
    role: str
    content: str | None


class Message(_RoleAndContent, total=False):
    """An OpenAI chat message. ``content`` may be None for an assistant message
    with ``tool_calls``; a ``tool`` message names the call it answers."""

    tool_calls: list[MessageToolCall]
    tool_call_id: str
    name: str


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

    Tools: a template renders OpenAI ``tools``, assistant ``tool_calls`` and
    ``tool`` messages itself when its ``render`` has a parameter named ``tools``
    (``render(messages, add_generation_prompt=True, tools=None)``), unless its
    optional ``renders_tools`` attribute says False (a Jinja template that never
    reads ``tools``). Any other template gets them as Hermes text in plain
    messages (see :func:`render_chat`).

    Template variables: a request's ``chat_template_kwargs`` (e.g.
    ``{"enable_thinking": false}``) reach a template whose ``render`` has a
    parameter named ``template_kwargs`` (a dict, or None), as
    ``apply_chat_template(**kwargs)`` gives them to a Jinja template; a template
    without it ignores them. Their names never collide with
    :data:`RESERVED_TEMPLATE_VARIABLES` (:func:`template_variables` checks).
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


def render_chat(template: ChatTemplate, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                tools: Sequence[dict] | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt for a chat request: ``messages``, OpenAI ``tools`` and the request's
    template variables (``template_kwargs``, for a template that takes them) through ``template``.

    Without tools, tool calls and tool messages this is
    ``template.render(messages, add_generation_prompt)``. With them, a
    template whose ``render`` takes ``tools`` renders them itself; any other
    gets the Hermes format (Qwen2.5's) as plain messages: the tools'
    instructions after the system message's text (or as a system message),
    each call as ``<tool_call>`` JSON after its assistant message's content,
    and tool results as a user message of ``<tool_response>`` blocks (one for
    consecutive results). Raises ``InvalidRequestError`` (``messages``) for a
    call whose arguments are not a JSON object.
    """
    if not tools and not has_tool_parts(messages):
        return render_messages(template, messages, add_generation_prompt, template_kwargs=template_kwargs)
    if takes_tools(template):
        return render_messages(template, messages, add_generation_prompt, template_kwargs=template_kwargs,
                               tools=tools or None)
    return render_messages(template, hermes_messages(messages, tools), add_generation_prompt,
                           template_kwargs=template_kwargs)


def render_messages(template: ChatTemplate, messages: Sequence[Message], add_generation_prompt: bool = True, *,
                    template_kwargs: Mapping[str, Any] | None = None, **arguments: Any) -> str:
    """``template.render(messages, add_generation_prompt, **arguments)``, with the request's
    template variables when there are some and the template takes them (:func:`takes_kwargs`)."""
    if template_kwargs and takes_kwargs(template):
        arguments["template_kwargs"] = dict(template_kwargs)
    return template.render(messages, add_generation_prompt, **arguments)


#: Variables the server gives a template itself: a request's ``chat_template_kwargs`` may not set them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def template_variables(chat_template_kwargs: Any, enable_thinking: bool | None = None) -> dict[str, Any]:
    """A request's template variables: its ``chat_template_kwargs`` (any names but
    :data:`RESERVED_TEMPLATE_VARIABLES`), with LMDeploy's top-level ``enable_thinking``
    as ``enable_thinking`` unless ``chat_template_kwargs`` sets it (that one wins, as
    in LMDeploy). An ``enable_thinking`` of None is an absent one.

    Raises ``InvalidRequestError`` naming the field: ``chat_template_kwargs`` when it
    is not an object or sets a reserved name, ``chat_template_kwargs.enable_thinking``
    when that is not a boolean (a template reads ``"no"`` as true).
    """
    if chat_template_kwargs is None:
        chat_template_kwargs = {}
    if not isinstance(chat_template_kwargs, Mapping):
        raise InvalidRequestError(f"chat_template_kwargs must be an object of template variables, "
                                  f"got {type(chat_template_kwargs).__name__}.", "chat_template_kwargs")
    variables = {name: value for name, value in chat_template_kwargs.items()
                 if not (name == "enable_thinking" and value is None)}
    reserved = [name for name in RESERVED_TEMPLATE_VARIABLES if name in variables]
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server gives the "
                                  f"template {', '.join(RESERVED_TEMPLATE_VARIABLES)} itself.", "chat_template_kwargs")
    if "enable_thinking" in variables and not isinstance(variables["enable_thinking"], bool):
        raise InvalidRequestError(f"chat_template_kwargs.enable_thinking must be true or false, "
                                  f"got {variables['enable_thinking']!r}.", "chat_template_kwargs.enable_thinking")
    if enable_thinking is not None:
        variables.setdefault("enable_thinking", enable_thinking)
    return variables


def takes_kwargs(template: ChatTemplate) -> bool:
    """Whether ``template``'s ``render`` takes a request's template variables (``template_kwargs``)."""
    return _has_parameter(template.render, "template_kwargs")


def takes_tools(template: ChatTemplate) -> bool:
    """Whether ``template`` renders tools itself: its ``render`` has a ``tools``
    parameter and its ``renders_tools`` (when it has one) is not False."""
    if getattr(template, "renders_tools", True) is False:
        return False
    return _has_parameter(template.render, "tools")


def _has_parameter(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def has_tool_parts(messages: Sequence[Message]) -> bool:
    """Whether a conversation holds tool calls or tool results."""
    return any(message["role"] == "tool" or message.get("tool_calls") for message in messages)


#: Stand in for an earlier exchange when a continuation is rendered
#: (private-use characters: no real message holds them).
_EARLIER_USER = "\ue000lmserve-earlier-question\ue001"
_EARLIER_REPLY = "\ue000lmserve-earlier-reply\ue001"


def render_continuation(template: ChatTemplate, messages: Sequence[Message], *,
                        template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text that continues a conversation after an assistant's reply: what
    the template writes after a reply's content (its end-of-turn mark and
    separator), then ``messages``, then the assistant's header. No system
    prompt, no BOS: they are in the conversation already.

    A template may define ``render_continuation(messages)`` itself (with a
    ``template_kwargs`` parameter when it takes them); otherwise it is derived
    from :meth:`ChatTemplate.render` of an earlier exchange followed by
    ``messages``, which works for every template that renders each message in
    place (the model's own Jinja templates do).
    """
    own = getattr(template, "render_continuation", None)
    if own is not None:
        if template_kwargs and _has_parameter(own, "template_kwargs"):
            return own(messages, template_kwargs=dict(template_kwargs))
        return own(messages)
    earlier: list[Message] = [{"role": "user", "content": _EARLIER_USER},
                              {"role": "assistant", "content": _EARLIER_REPLY}]
    text = render_messages(template, [*earlier, *messages], template_kwargs=template_kwargs)
    at = text.find(_EARLIER_REPLY)
    if at < 0:
        raise ValueError(f"The chat template {template.name!r} drops earlier replies, so it cannot "
                         "continue a conversation.")
    return text[at + len(_EARLIER_REPLY):]

