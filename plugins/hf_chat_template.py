"""The ``hf`` chat template: the model's own Jinja template, rendered in a sandbox.

The template comes from GGUF ``tokenizer.chat_template`` or
``tokenizer_config.json``; it is rendered the way HF transformers'
``apply_chat_template`` renders it (same Jinja options, globals and filters),
so prompts match token for token.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Sequence

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmserve.core import hookimpl
from lmserve.core.chat_template import Message
from lmserve.core.tool_prompts import tool_call_parts
from lmserve.core.types import InvalidRequestError


class JinjaChatTemplate:
    """Renders messages with a Jinja chat template in an immutable sandbox."""

    name = "hf"

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.stop_words: tuple[str, ...] = (eos_token,) if eos_token else ()
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
            #: Whether the template reads ``tools`` (see ``ChatTemplate``: else they go in as Hermes text).
            self.renders_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"The model's chat template does not parse: {exc}") from exc

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None, template_kwargs: dict | None = None) -> str:
        """As ``apply_chat_template(messages, tools=tools, **template_kwargs)``: ``tools`` are the
        OpenAI tool dicts; a call's ``function.arguments`` reaches the template
        as an object, not JSON text (templates write ``arguments | tojson``).
        A template that never reads ``tools`` (SmolLM2's, most older ones) says so
        with :attr:`renders_tools`:
        :func:`~lmserve.core.chat_template.render_chat` then gives it the tools,
        calls and results as Hermes text in plain messages. ``template_kwargs``
        (a request's ``chat_template_kwargs``, e.g. ``enable_thinking``) are
        extra variables; their names are not the five the server passes
        (:func:`~lmserve.core.chat_template.template_variables` checked), and
        may shadow a global such as ``raise_exception``, as in transformers."""
        try:
            return self._template.render(
                **(template_kwargs or {}),
                messages=[_with_parsed_arguments(message) for message in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except (jinja2.TemplateError, TypeError, KeyError) as exc:
            raise InvalidRequestError(f"The chat template refused the messages: {exc}", "messages") from exc


def _with_parsed_arguments(message: Message) -> Message:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        _, arguments = tool_call_parts(call)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}


class _TemplateRaised(jinja2.TemplateError):
    pass


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's own tojson: no HTML escaping, unlike Jinja's built-in filter.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def model_chat_template(tokenizer) -> JinjaChatTemplate | None:
    """The model's own template, or None when its tokenizer carries none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    return JinjaChatTemplate(template, tokenizer.bos_token, tokenizer.eos_token)


@hookimpl
def lmserve_chat_template(source, tokenizer, config):
    return model_chat_template(tokenizer)
