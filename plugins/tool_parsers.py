"""The built-in tool-call parsers: the built-ins of :hook:`lmserve_tool_parsers`.

Every built-in format writes a call as a JSON object ``{"name": ..., "arguments":
{...}}`` (``"parameters"`` is read alike) and differs only in what frames it:

- ``hermes`` (Qwen2.5's, and the Hermes text every template without a tool format
  of its own is given): ``<tool_call>`` JSON ``</tool_call>`` blocks, anywhere.
- ``llama3`` (Llama 3.1's): JSON after ``<|python_tag|>``, or an output that
  starts with ``{``; several calls separated by ``;``.
- ``internlm`` (InternLM2's): ``<|action_start|><|plugin|>`` JSON ``<|action_end|>``.
- ``json``: an output that is a JSON array of calls, as ``tool_choice: required``'s
  grammar makes it.

Each is a :class:`~lmserve.plugins.json_calls.JsonCallParser` that names its
markers; the reading itself (streamed and whole alike) is in
``lmserve.plugins.json_calls``.
"""

from __future__ import annotations

from lmserve.core import hookimpl
from lmserve.core.tool_calls import ToolParser
from lmserve.plugins.json_calls import JsonCallParser


class HermesToolParser(JsonCallParser):
    """Qwen2.5's and Hermes': ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    name = "hermes"
    aliases = ("qwen", "qwen2.5", "qwen2d5", "qwen3")
    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"

    @classmethod
    def fits(cls, template_source: str) -> bool:
        return "<tool_call>" in template_source


class Llama3JsonToolParser(JsonCallParser):
    """Llama 3.1's JSON calls: ``<|python_tag|>`` (a special token) or the output's
    start, then ``{"name": ..., "parameters": {...}}``, several separated by ``;``.
    Text that starts otherwise is content."""

    name = "llama3"
    aliases = ("llama3.1", "llama3_1", "llama3_json")
    needs_special_tokens = True
    start_markers = ("<|python_tag|>",)
    leading_marker = ""
    separator = ";"

    @classmethod
    def fits(cls, template_source: str) -> bool:
        """The template writes ``<|python_tag|>``, or has Llama 3's headers and
        mentions ``"parameters"`` (its JSON call instructions)."""
        return "<|python_tag|>" in template_source or (
            "<|start_header_id|>" in template_source and '"parameters"' in template_source)


class InternLMToolParser(JsonCallParser):
    """InternLM2's: ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>``
    (special tokens); other actions (``<|interpreter|>``) are content."""

    name = "internlm"
    aliases = ("internlm2", "intern-s1", "internlm2_5")
    needs_special_tokens = True
    start_markers = ("<|action_start|><|plugin|>",)
    end_marker = "<|action_end|>"

    @classmethod
    def fits(cls, template_source: str) -> bool:
        return "<|plugin|>" in template_source or "<|action_start|>" in template_source


class JsonArrayToolParser(JsonCallParser):
    """An output that is a JSON array of calls, ``[{"name": ..., "parameters": {...}}, ...]``:
    what ``tool_choice: required``'s grammar produces. No template writes it."""

    name = "json"
    leading_marker = "["
    separator = ","
    end_marker = "]"


BUILTIN_PARSERS: tuple[type[ToolParser], ...] = (
    HermesToolParser, Llama3JsonToolParser, InternLMToolParser, JsonArrayToolParser)


@hookimpl(trylast=True)
def lmserve_tool_parsers():
    return list(BUILTIN_PARSERS)