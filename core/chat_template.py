"""Chat templates: the interface, the registry of contributed templates, and the choice.

Plugins only contribute: templates through :hook:`lmserve_chat_templates` (the
registry), the model's own template through :hook:`lmserve_chat_template`. The
rules live here and nowhere else: the registry's names, LMDeploy's templates of
fields (:class:`FieldsChatTemplate`) and their JSON format (``--chat-template``),
the order of the choice, and ``--meta-instruction``. The choice, in order:

1. ``--chat-template``: an existing JSON file, ``hf`` (the template
   :hook:`lmserve_chat_template` gives under that name; the built-in gives the
   model's own Jinja template), a registry name, or a JSON string;
2. :hook:`lmserve_chat_template` (the built-in returns the model's own Jinja
   template, ``hf``, when it ships one);
3. the first registry template whose ``matches(MODEL)`` is true (plugins'
   templates before the built-ins);
4. ``base``, the identity, with a warning.

``--meta-instruction`` then sets the default system prompt of whichever won.

Like the rest of the kernel, this module imports only ``lmserve.core`` and the
standard library (no Jinja: the ``hf`` template is a plugin's).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence, TypedDict, runtime_checkable

from lmserve.core.plugins import PluginError, call_safely
from lmserve.core.tool_prompts import (
    TOOL_FORMATS,
    function_of,
    hermes_messages,
    internlm2_calls,
    llama31_messages,
    message_text,
    with_calls_as_text,
)
from lmserve.core.types import InvalidRequestError

logger = logging.getLogger(__name__)

#: The name of the model's own Jinja template; no registry template may take it.
HF = "hf"
#: LMDeploy's ``capability`` values; only ``completion`` changes the rendering.
CAPABILITIES = ("completion", "infilling", "chat", "python")


# ------------------------------------------------------------------------ interface


class FunctionCall(TypedDict):
    name: str
    #: The arguments object as JSON text (OpenAI's shape).
    arguments: str


class ToolCall(TypedDict):
    """A call an assistant message made: ``{"id", "type": "function", "function"}``."""

    id: str
    type: str
    function: FunctionCall


class _RoleAndContent(TypedDict):
    role: str
    content: str | None


class Message(_RoleAndContent, total=False):
    """An OpenAI chat message. ``content`` may be None for an assistant message
    with ``tool_calls``; a ``tool`` message names the call it answers."""

    tool_calls: list[ToolCall]
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
                tools: Sequence[dict] | None = None) -> str:
    """The prompt for a chat request: ``messages`` and OpenAI ``tools`` through ``template``.

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
        return template.render(messages, add_generation_prompt)
    if takes_tools(template):
        return template.render(messages, add_generation_prompt, tools=tools or None)
    return template.render(hermes_messages(messages, tools), add_generation_prompt)


def takes_tools(template: ChatTemplate) -> bool:
    """Whether ``template`` renders tools itself: its ``render`` has a ``tools``
    parameter and its ``renders_tools`` (when it has one) is not False."""
    if getattr(template, "renders_tools", True) is False:
        return False
    try:
        return "tools" in inspect.signature(template.render).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def has_tool_parts(messages: Sequence[Message]) -> bool:
    """Whether a conversation holds tool calls or tool results."""
    return any(message["role"] == "tool" or message.get("tool_calls") for message in messages)


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


# ------------------------------------------------------------------------- base


class BaseChatTemplate:
    """Concatenates the messages' contents; adds nothing.

    The last resort of the choice, and ``--chat-template base`` for a model that
    needs no decoration (``lmserve.plugins.base_chat_template`` contributes it
    to the registry).
    """

    name = "base"
    stop_words: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return "".join(message["content"] for message in messages)


# ----------------------------------------------------------------- LMDeploy's fields


@dataclass(frozen=True)
class FieldsChatTemplate:
    """A chat template made of LMDeploy's ``ChatTemplateConfig`` fields.

    Rendering follows LMDeploy's ``BaseChatTemplate.messages2prompt``:
    ``{system}{meta_instruction}{eosys}`` first, when ``meta_instruction`` is
    not None and the conversation does not start with a system message (None
    means no default system prompt; ``""`` still writes ``system`` and
    ``eosys``); then each message as ``{box}{content}{eox}``, the boxes being
    ``system``/``user``/``assistant``/``tool`` and the ends
    ``eosys``/``eoh``/``eoa + separator``/``eotool``; then the assistant's
    header. A conversation that ends with an assistant message is the prefix
    of a reply to continue: its ``eoa + separator`` is left off, and no header
    follows. (LMDeploy's own ``qwen2d5`` and ``vicuna`` classes depart from
    that rule for such a conversation, the first adding the header anyway,
    the second cutting the reply's last character; here every template keeps
    the rule.)

    ``match_all`` and ``match_none`` say which models it fits, as LMDeploy's
    ``match`` rules do: every group in ``match_all`` must have one of its
    strings in the lowercased model name, and no string of ``match_none`` may
    be in it. An empty ``match_all`` matches nothing (chosen by name only).

    Tools (``render(..., tools=...)``, tool calls, ``tool`` messages) are
    written in LMDeploy's ``tool_format`` of the template: ``hermes``
    (Qwen2.5's: the tools' instructions after the system text, the default
    one being ``meta_instruction``; ``<tool_call>`` JSON after a reply;
    results as a user turn of ``<tool_response>`` blocks), ``internlm2`` (the
    tools in a ``system name=<|plugin|>`` turn after the system turn; calls as
    ``<|action_start|><|plugin|>`` JSON; results in the ``tool`` box),
    ``llama3.1`` (``Environment: ipython`` in the system turn, the tools
    before the first user message, calls after ``<|python_tag|>``, results in
    the ``tool`` box); None is Hermes text too, tool results going in the
    ``tool`` box when the template has one.
    """

    name: str
    system: str = ""
    #: The default system prompt; LMDeploy's BaseChatTemplate defaults it to "" too.
    meta_instruction: str | None = ""
    eosys: str = ""
    user: str = ""
    eoh: str = ""
    assistant: str = ""
    eoa: str = ""
    separator: str = ""
    tool: str = ""
    eotool: str = ""
    #: ``completion``: messages are not decorated (their contents, concatenated).
    capability: str = "chat"
    stop_words: tuple[str, ...] = ()
    #: Written once, before the whole conversation (Llama 3's ``<|begin_of_text|>``).
    prefix: str = ""
    aliases: tuple[str, ...] = ()
    match_all: tuple[tuple[str, ...], ...] = ()
    match_none: tuple[str, ...] = ()
    #: How tools, calls and results are written: one of :data:`TOOL_FORMATS`, or None.
    tool_format: str | None = None

    def __post_init__(self) -> None:
        if self.capability not in CAPABILITIES:
            raise ValueError(f"Chat template {self.name!r}: capability must be one of "
                             f"{', '.join(CAPABILITIES)}, got {self.capability!r}.")
        if self.tool_format is not None and self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"Chat template {self.name!r}: tool_format must be None or one of "
                             f"{', '.join(TOOL_FORMATS)}, got {self.tool_format!r}.")
        object.__setattr__(self, "stop_words", tuple(self.stop_words))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None) -> str:
        if self.capability == "completion":
            return "".join(message_text(message) for message in messages)
        tools_turn = ""
        if tools or has_tool_parts(messages):
            messages, tools_turn = self._with_tools(messages, tools)
        text = self.prefix
        if self.meta_instruction is not None and messages and messages[0]["role"] != "system":
            text += f"{self.system}{self.meta_instruction}{self.eosys}"
        if tools_turn:  # InternLM2's: right after the system turn
            head = 1 if messages and messages[0]["role"] == "system" else 0
            text += "".join(self._message(message) for message in messages[:head]) + tools_turn
            messages = messages[head:]
        return text + self._turns(messages, add_generation_prompt)

    def _with_tools(self, messages: Sequence[Message], tools: Sequence[dict] | None) -> tuple[list[Message], str]:
        """Plain messages in the template's ``tool_format``, and InternLM2's turn of tools."""
        if self.tool_format == "internlm2":
            plain = [with_calls_as_text(message, internlm2_calls) for message in messages]
            listed = json.dumps([function_of(tool) for tool in tools or ()], ensure_ascii=False)
            return plain, f"{self.system.strip()} name=<|plugin|>\n{listed}{self.eosys}" if tools else ""
        if self.tool_format == "llama3.1":
            return llama31_messages(messages, tools, self.meta_instruction), ""
        merge = self.tool_format == "hermes" or not (self.tool or self.eotool)
        return hermes_messages(messages, tools, self.meta_instruction, merge_results=merge), ""

    def render_continuation(self, messages: Sequence[Message]) -> str:
        """What follows a reply's content: its ``eoa + separator``, then
        ``messages`` and the assistant's header (LMDeploy's later-turn prompt,
        ``separator + user + prompt + eoh + assistant``, with the ``eoa`` the
        model usually writes as its stop token)."""
        if self.capability == "completion":
            return "".join(message_text(message) for message in messages)
        if has_tool_parts(messages):
            messages, _ = self._with_tools(messages, None)
        return self.eoa + self.separator + self._turns(messages, add_generation_prompt=True)

    def with_tokenizer_bos(self, tokenizer) -> FieldsChatTemplate:
        """This template writing the BOS a tokenizer adds, once, before the conversation.

        LMDeploy encodes a conversation's first prompt with the tokenizer's
        special tokens (Llama 2's and Mistral's ``<s>``, never twice); lmserve
        encodes the rendered text as it is, so the text carries it.
        """
        bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) else None
        if not bos or self.prefix.startswith(bos):
            return self
        return dataclasses.replace(self, prefix=bos + self.prefix)

    def matches(self, model_name: str) -> bool:
        name = model_name.lower()
        return (bool(self.match_all) and all(any(s in name for s in group) for group in self.match_all)
                and not any(s in name for s in self.match_none))

    @property
    def match_rule(self) -> str:
        """``matches`` in words, e.g. ``('qwen2.5' or 'qwen2_5') and not 'vl'``."""
        if not self.match_all:
            return "(by name only)"
        several = len(self.match_all) > 1 or bool(self.match_none)
        groups = [" or ".join(repr(s) for s in group) for group in self.match_all]
        rule = " and ".join(f"({group})" if several and len(group_strings) > 1 else group
                            for group, group_strings in zip(groups, self.match_all))
        if len(self.match_none) == 1:
            rule += f" and not {self.match_none[0]!r}"
        elif self.match_none:
            rule += " and none of " + ", ".join(repr(s) for s in self.match_none)
        return rule

    def _turns(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = "".join(self._message(message) for message in messages)
        if messages and messages[-1]["role"] == "assistant":
            return text[:len(text) - len(self.eoa + self.separator)]
        return text + self._generation_prompt() if add_generation_prompt else text

    def _message(self, message: Message) -> str:
        ends = {"system": (self.system, self.eosys), "user": (self.user, self.eoh),
                "assistant": (self.assistant, self.eoa + self.separator), "tool": (self.tool, self.eotool)}
        role = message["role"]
        if role not in ends:
            raise InvalidRequestError(f"The chat template {self.name!r} has no role {role!r} "
                                      f"(it knows {', '.join(ends)}).", "messages")
        begin, end = ends[role]
        return f"{begin}{message_text(message)}{end}"

    def _generation_prompt(self) -> str:
        return self.assistant


# ------------------------------------------------------------------------ registry


class ChatTemplateRegistry:
    """The templates plugins contributed, by name and alias, in matching order."""

    def __init__(self, templates: Iterable[ChatTemplate]):
        self.templates: list[ChatTemplate] = []
        self._by_name: dict[str, ChatTemplate] = {}
        for template in templates:
            for name in (template.name, *getattr(template, "aliases", ())):
                if name == HF or name in self._by_name:
                    raise PluginError(f"Two chat templates are named {name!r} ('hf' is the model's own).")
                self._by_name[name] = template
            self.templates.append(template)

    @classmethod
    def from_plugins(cls, pm) -> ChatTemplateRegistry:
        return cls(template for contributed in call_safely(pm, "lmserve_chat_templates") for template in contributed)

    @property
    def names(self) -> list[str]:
        return [HF, *self._by_name]

    def get(self, name: str) -> ChatTemplate | None:
        return self._by_name.get(name)

    def match(self, model_name: str) -> ChatTemplate | None:
        for template in self.templates:
            matches = getattr(template, "matches", None)
            if matches is not None and matches(model_name):
                return template
        return None

    def from_json(self, text_or_path: str) -> FieldsChatTemplate:
        """A template from LMDeploy's ``ChatTemplateConfig`` JSON (a file or a string).

        As in LMDeploy: a null field keeps its default; a missing
        ``model_name`` gets a generated one; a ``model_name`` the registry knows
        starts from that template and overrides the fields given; any other
        name builds the template from the fields alone.
        """
        path = Path(text_or_path)
        text = path.read_text(encoding="utf-8") if _is_file(path) else text_or_path
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--chat-template: not valid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise ValueError("--chat-template: the JSON must be an object of LMDeploy's template fields.")
        unknown = sorted(set(data) - {"model_name", *JSON_FIELDS})
        if unknown:
            raise ValueError(f"--chat-template: unknown field(s) {', '.join(unknown)}; the fields are "
                             f"model_name, {', '.join(JSON_FIELDS)}.")
        fields = {key: value for key, value in data.items() if value is not None}
        name = fields.pop("model_name", None) or f"custom-{uuid.uuid4().hex[:8]}"
        for key, value in fields.items():
            valid = (isinstance(value, list) and all(isinstance(word, str) for word in value)
                     if key == "stop_words" else isinstance(value, str))
            if not valid:
                kind = "a list of strings" if key == "stop_words" else "a string"
                raise ValueError(f"--chat-template: {key} must be {kind}, got {value!r}.")
        if "stop_words" in fields:
            fields["stop_words"] = tuple(fields["stop_words"])
        known = self.get(name)
        if known is None:
            return FieldsChatTemplate(name, **fields)
        if not isinstance(known, FieldsChatTemplate):
            raise ValueError(f"--chat-template: the template {name!r} is not made of LMDeploy's fields, so a "
                             "JSON template cannot override it; give the JSON another model_name.")
        return dataclasses.replace(known, **fields)


#: The fields of LMDeploy's JSON template format, besides ``model_name``.
JSON_FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator",
               "tool", "eotool", "capability", "stop_words")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a JSON string too long to be a file name
        return False


# -------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class TemplateChoice:
    template: ChatTemplate
    #: Why this one, in a phrase for the startup log and ``lmserve templates``.
    reason: str


def choose_chat_template(pm, source, tokenizer, config) -> TemplateChoice:
    """The template the server renders chat messages with (see the module's docstring)."""
    registry = ChatTemplateRegistry.from_plugins(pm)
    template, reason = _choose(pm, registry, source, tokenizer, config)
    if isinstance(template, FieldsChatTemplate):
        template = template.with_tokenizer_bos(tokenizer)
    if config.meta_instruction is not None:
        template = with_meta_instruction(template, config.meta_instruction)
        reason += "; --meta-instruction sets its default system prompt"
    return TemplateChoice(template, reason)


def _choose(pm, registry: ChatTemplateRegistry, source, tokenizer, config) -> tuple[ChatTemplate, str]:
    wanted = config.chat_template
    if wanted:
        if _is_file(Path(wanted)):
            return registry.from_json(wanted), f"--chat-template file {wanted}"
        if wanted == HF:
            # The model's own template is rendered by a plugin (Jinja is no kernel business).
            template = call_safely(pm, "lmserve_chat_template", source=source, tokenizer=tokenizer, config=config)
            if template is None:
                raise ValueError(f"--chat-template hf: {source.name} ships no Jinja chat template.")
            if template.name != HF:
                raise ValueError(f"--chat-template hf: a plugin chose {template.name!r} for {source.name} "
                                 "(lmserve_chat_template), not the model's own template.")
            return template, "--chat-template hf"
        if registry.get(wanted) is not None:
            return registry.get(wanted), f"--chat-template {wanted}"
        if wanted.lstrip().startswith("{"):
            return registry.from_json(wanted), "--chat-template JSON"
        raise ValueError(f"--chat-template {wanted!r} is neither a JSON file, nor a JSON object, nor a known "
                         f"template; the known ones: {', '.join(registry.names)}.")
    template = call_safely(pm, "lmserve_chat_template", source=source, tokenizer=tokenizer, config=config)
    if template is not None:
        if template.name == HF:
            return template, "the model ships its own Jinja chat template"
        return template, "a plugin chose it (lmserve_chat_template)"
    template = registry.match(config.model)
    if template is not None:
        rule = getattr(template, "match_rule", "its match rule")
        return template, f"no Jinja template of its own, and {config.model!r} matches {rule}"
    logger.warning("No chat template found for %s (no Jinja template of its own, no name match): using "
                   "'base', which only concatenates messages; see --chat-template.", config.model)
    return BaseChatTemplate(), "no Jinja template of its own and no name match"


# --------------------------------------------------------------- --meta-instruction


def with_meta_instruction(template: ChatTemplate, text: str) -> ChatTemplate:
    """``template`` with ``text`` as its default system prompt."""
    if isinstance(template, FieldsChatTemplate):
        return dataclasses.replace(template, meta_instruction=text)
    return DefaultSystemPrompt(template, text)


class DefaultSystemPrompt:
    """Puts a system message first when a conversation has none, for any template."""

    def __init__(self, template: ChatTemplate, text: str):
        self.template = template
        self.text = text
        self.name = template.name
        self.stop_words = template.stop_words

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.text}, *messages]
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def render_continuation(self, messages: Sequence[Message]) -> str:
        # A later turn: the system prompt is in the conversation already.
        return render_continuation(self.template, messages)
