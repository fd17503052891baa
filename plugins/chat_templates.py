"""LMDeploy's chat templates as data: the built-ins of :hook:`lmserve_chat_templates`.

A template of this kind is LMDeploy's ``BaseChatTemplate``: a handful of
strings (``system``, ``meta_instruction``, ``eosys``, ``user``, ``eoh``,
``assistant``, ``eoa``, ``separator``, ...) put around each message
(:class:`~lmserve.core.fields_chat_template.FieldsChatTemplate`). The built-ins carry
LMDeploy's own strings, so a prompt matches LMDeploy's character for character,
and LMDeploy's way of writing tools where it has one (``tool_format``: ``qwen2.5``,
``internlm2``, ``llama3.1``).

This module only contributes templates: the registry, LMDeploy's JSON format
(``--chat-template``) and the choice of a template are the kernel's
(``lmserve.core.template_choice``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.core import hookimpl
from lmserve.core.fields_chat_template import FieldsChatTemplate


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
_LLAMA3 = dict(prefix="<|begin_of_text|>", system=_LLAMA3_HEADER.format("system"), meta_instruction=None,
               eosys="<|eot_id|>", user=_LLAMA3_HEADER.format("user"), eoh="<|eot_id|>",
               assistant=_LLAMA3_HEADER.format("assistant"), eoa="<|eot_id|>")

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
        tool="<|im_start|>environment name=<|plugin|>\n", eotool="<|im_end|>\n", tool_format="internlm2",
        match_all=(("internlm2",), ("chat", "math")),
    ),
    FieldsChatTemplate(
        "llama2", system="[INST] <<SYS>>\n", meta_instruction=_LLAMA2_META, eosys="\n<</SYS>>\n\n",
        assistant=" [/INST] ", eoa="</s>", separator="<s>[INST] ",
        match_all=(("llama-2", "llama2"),),
    ),
    # Before llama3, whose rule ('llama-3-', 'llama3-') no 3.1 name meets anyway.
    FieldsChatTemplate(
        "llama3.1", **_LLAMA3, tool=_LLAMA3_HEADER.format("ipython"), eotool="<|eot_id|>",
        stop_words=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"), tool_format="llama3.1",
        aliases=("llama3_1",), match_all=(("llama-3.1", "llama3.1", "llama-3_1", "llama3_1"),),
    ),
    FieldsChatTemplate(
        "llama3", **_LLAMA3, stop_words=("<|eot_id|>", "<|end_of_text|>"),
        match_all=(("llama-3-", "llama3-"),), match_none=("internvl2",),
    ),
    FieldsChatTemplate(
        "qwen", meta_instruction="You are a helpful assistant.", **_IM,
        match_all=(("qwen",),), match_none=("qwen2.5", "qwq", "qwen3"),
    ),
    FieldsChatTemplate(
        "qwen2.5", meta_instruction="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **_IM,
        tool_format="hermes", aliases=("qwen2d5",), match_all=(("qwen2.5", "qwen2_5"),), match_none=("vl",),
    ),
    FieldsChatTemplate(
        "mistral", user="[INST] ", eoh=" [/INST]", eoa="</s>",
        aliases=("mixtral",), match_all=(("instruct", "llava"), ("mistral", "mixtral")),
    ),
)


@hookimpl
def lmserve_chat_templates():
    return list(BUILTIN_TEMPLATES)
