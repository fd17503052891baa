"""LMDeploy's chat templates as data, the template registry, and how one is chosen.

A template of this kind is LMDeploy's ``BaseChatTemplate``: a handful of
strings (``system``, ``meta_instruction``, ``eosys``, ``user``, ``eoh``,
``assistant``, ``eoa``, ``separator``, ...) put around each message. The
built-ins carry LMDeploy's own strings, so a prompt matches LMDeploy's
character for character, and ``--chat-template`` reads LMDeploy's JSON format.

The registry is every template contributed through :hook:`lmserve_chat_templates`
(this module contributes the built-ins). The choice, in order:

1. ``--chat-template``: a registry name, ``hf``, a JSON file or a JSON string;
2. :hook:`lmserve_chat_template` (the built-in returns the model's own Jinja
   template, ``hf``, when it ships one);
3. the first registry template whose ``matches(MODEL)`` is true (plugins'
   templates before the built-ins);
4. ``base``, the identity, with a warning.

``--meta-instruction`` then sets the default system prompt of whichever won.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lmserve.core import hookimpl
from lmserve.core.chat_template import ChatTemplate, Message, render_continuation
from lmserve.core.plugins import PluginError, call_safely
from lmserve.core.types import InvalidRequestError
from lmserve.plugins.base_chat_template import BaseChatTemplate
from lmserve.plugins.hf_chat_template import model_chat_template

logger = logging.getLogger(__name__)

#: The name of the model's own Jinja template; no registry template may take it.
HF = "hf"
#: LMDeploy's ``capability`` values; only ``completion`` changes the rendering.
CAPABILITIES = ("completion", "infilling", "chat", "python")


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

    def __post_init__(self) -> None:
        if self.capability not in CAPABILITIES:
            raise ValueError(f"Chat template {self.name!r}: capability must be one of "
                             f"{', '.join(CAPABILITIES)}, got {self.capability!r}.")
        object.__setattr__(self, "stop_words", tuple(self.stop_words))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self.capability == "completion":
            return "".join(message["content"] for message in messages)
        text = self.prefix
        if self.meta_instruction is not None and messages and messages[0]["role"] != "system":
            text += f"{self.system}{self.meta_instruction}{self.eosys}"
        return text + self._turns(messages, add_generation_prompt)

    def render_continuation(self, messages: Sequence[Message]) -> str:
        """What follows a reply's content: its ``eoa + separator``, then
        ``messages`` and the assistant's header (LMDeploy's later-turn prompt,
        ``separator + user + prompt + eoh + assistant``, with the ``eoa`` the
        model usually writes as its stop token)."""
        if self.capability == "completion":
            return "".join(message["content"] for message in messages)
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
        return f"{begin}{message['content']}{end}"

    def _generation_prompt(self) -> str:
        return self.assistant


@dataclass(frozen=True)
class VicunaChatTemplate(FieldsChatTemplate):
    """LMDeploy's Vicuna: the generation prompt leaves the assistant header's
    trailing space off (``ASSISTANT:``); the model writes it as part of its
    reply's first token, as SentencePiece spells a word with its space."""

    def _generation_prompt(self) -> str:
        return self.assistant[:-1]


_IM = dict(system="<|im_start|>system\n", eosys="<|im_end|>\n", user="<|im_start|>user\n", eoh="<|im_end|>\n",
           assistant="<|im_start|>assistant\n", eoa="<|im_end|>", separator="\n", stop_words=("<|im_end|>",))

_INTERNLM_META = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.\n"
)
_LLAMA2_META = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAMA3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

#: The built-ins, in matching order, with LMDeploy 0.9's strings and match rules.
BUILTIN_TEMPLATES: tuple[FieldsChatTemplate, ...] = (
    # The layout of LMDeploy's custom-template example: ChatML, no default system prompt.
    FieldsChatTemplate("chatml", meta_instruction=None, **_IM),
    VicunaChatTemplate(
        "vicuna",
        meta_instruction="A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions.",
        eosys=" ", user="USER: ", eoh=" ", assistant="ASSISTANT: ", eoa="</s>", stop_words=("</s>",),
        match_all=(("vicuna",),), match_none=("llava",),
    ),
    FieldsChatTemplate(
        "internlm2", **{**_IM, "stop_words": ("<|im_end|>", "<|action_end|>")}, meta_instruction=_INTERNLM_META,
        match_all=(("internlm2",), ("chat", "math")),
    ),
    FieldsChatTemplate(
        "llama2", system="[INST] <<SYS>>\n", meta_instruction=_LLAMA2_META, eosys="\n<</SYS>>\n\n",
        assistant=" [/INST] ", eoa="</s>", separator="<s>[INST] ",
        match_all=(("llama-2", "llama2"),),
    ),
    FieldsChatTemplate(
        "llama3", prefix="<|begin_of_text|>", system=_LLAMA3_HEADER.format("system"), meta_instruction=None,
        eosys="<|eot_id|>", user=_LLAMA3_HEADER.format("user"), eoh="<|eot_id|>",
        assistant=_LLAMA3_HEADER.format("assistant"), eoa="<|eot_id|>", stop_words=("<|eot_id|>", "<|end_of_text|>"),
        match_all=(("llama-3-", "llama3-"),), match_none=("internvl2",),
    ),
    FieldsChatTemplate(
        "qwen", meta_instruction="You are a helpful assistant.", **_IM,
        match_all=(("qwen",),), match_none=("qwen2.5", "qwq", "qwen3"),
    ),
    FieldsChatTemplate(
        "qwen2.5", meta_instruction="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **_IM,
        aliases=("qwen2d5",), match_all=(("qwen2.5", "qwen2_5"),), match_none=("vl",),
    ),
    FieldsChatTemplate(
        "mistral", user="[INST] ", eoh=" [/INST]", eoa="</s>",
        aliases=("mixtral",), match_all=(("instruct", "llava"), ("mistral", "mixtral")),
    ),
)


@hookimpl
def lmserve_chat_templates():
    return list(BUILTIN_TEMPLATES)


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
            template = model_chat_template(tokenizer)
            if template is None:
                raise ValueError(f"--chat-template hf: {source.name} ships no Jinja chat template.")
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

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.text}, *messages]
        return self.template.render(messages, add_generation_prompt)

    def render_continuation(self, messages: Sequence[Message]) -> str:
        # A later turn: the system prompt is in the conversation already.
        return render_continuation(self.template, messages)
