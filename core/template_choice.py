"""The choice of the server's chat template, and the registry it chooses from.

Plugins only contribute: templates through :hook:`lmserve_chat_templates` (the
:class:`ChatTemplateRegistry`), the model's own template through
:hook:`lmserve_chat_template`. The rules live here and nowhere else: the
registry's names, LMDeploy's JSON template format (``--chat-template``), the
order of the choice, and ``--meta-instruction``. The choice, in order:

1. ``--chat-template``: an existing JSON file, ``hf`` (the template
   :hook:`lmserve_chat_template` gives under that name; the built-in gives the
   model's own Jinja template), a registry name, or a JSON string;
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

from lmserve.core.chat_template import ChatTemplate, Message, render_chat, render_continuation
from lmserve.core.fields_chat_template import BaseChatTemplate, FieldsChatTemplate
from lmserve.core.plugins import PluginError, call_safely

logger = logging.getLogger(__name__)

#: The name of the model's own Jinja template; no registry template may take it.
HF = "hf"


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
               tools: Sequence[dict] | None = None, template_kwargs: dict | None = None) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.text}, *messages]
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           template_kwargs=template_kwargs)

    def render_continuation(self, messages: Sequence[Message], template_kwargs: dict | None = None) -> str:
        # A later turn: the system prompt is in the conversation already.
        return render_continuation(self.template, messages, template_kwargs=template_kwargs)
