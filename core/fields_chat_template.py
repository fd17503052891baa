"""Chat templates made of fields: LMDeploy's ``ChatTemplateConfig``, and the identity.

:class:`FieldsChatTemplate` is LMDeploy's template format: strings that box each
role's messages (``system``/``eosys``, ``user``/``eoh``, ...), rendered as
LMDeploy's ``BaseChatTemplate.messages2prompt`` does. The built-in registry
templates are such data (``lmserve.plugins.chat_templates``), and so is a
``--chat-template`` JSON (read by :mod:`lmserve.core.template_choice`).
:class:`BaseChatTemplate` only concatenates the messages' contents: the last
resort of the choice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence

from lmserve.core.chat_template import Message, has_tool_parts
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

#: LMDeploy's ``capability`` values; only ``completion`` changes the rendering.
CAPABILITIES = ("completion", "infilling", "chat", "python")


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
