"""A request's chat_template_kwargs reach the Jinja template as variables (as transformers'
apply_chat_template(**kwargs) gives them), on every way a prompt is rendered; a template
that does not take them ignores them; names the server sets and a non-boolean
enable_thinking are refused naming the field."""

from __future__ import annotations

import pytest

from lmserve.core.chat_template import render_chat, render_continuation, template_variables
from lmserve.core.fields_chat_template import BaseChatTemplate
from lmserve.core.template_choice import with_meta_instruction
from lmserve.core.types import InvalidRequestError
from lmserve.plugins.hf_chat_template import JinjaChatTemplate

#: Qwen3's way: with enable_thinking false the generation prompt closes an empty think block.
THINKING = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
    "{% if greeting is defined %}{{ greeting }}{% endif %}"
)
TOOLS_TOO = THINKING + "{% if tools %}{{ tools | length }} tools{% endif %}"
EMPTY_THINK = "<think>\n\n</think>\n\n"
HI = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.fixture
def template():
    return JinjaChatTemplate(THINKING, "<s>", "<|im_end|>")


def test_enable_thinking_false_reaches_the_template_and_true_or_absent_do_not_close_the_block(template):
    off = render_chat(template, HI, template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert render_chat(template, HI, template_kwargs={"enable_thinking": True}) == render_chat(template, HI)
    assert EMPTY_THINK not in render_chat(template, HI)


def test_any_variable_reaches_the_template(template):
    assert render_chat(template, HI, template_kwargs={"greeting": "hello there"}).endswith("hello there")


@pytest.mark.parametrize("renders_tools", [True, False])
def test_template_variables_go_along_with_tools_rendered_by_the_template_or_as_hermes_text(renders_tools):
    template = JinjaChatTemplate(TOOLS_TOO if renders_tools else THINKING, "<s>", "<|im_end|>")
    assert template.renders_tools is renders_tools
    text = render_chat(template, HI, tools=[WEATHER], template_kwargs={"enable_thinking": False})
    assert EMPTY_THINK in text
    assert ("1 tools" in text) is renders_tools and ("<tools>" in text) is not renders_tools


def test_a_later_turn_of_a_session_renders_with_the_variables_too(template):
    continuation = render_continuation(template, HI, template_kwargs={"enable_thinking": False})
    assert continuation == "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK
    assert EMPTY_THINK not in render_continuation(template, HI)


def test_the_default_system_prompt_wrapper_passes_the_variables_on(template):
    wrapped = with_meta_instruction(template, "Be brief.")
    text = render_chat(wrapped, HI, template_kwargs={"enable_thinking": False})
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith(EMPTY_THINK)
    assert render_continuation(wrapped, HI, template_kwargs={"enable_thinking": False}).endswith(EMPTY_THINK)


def test_a_template_that_takes_no_variables_ignores_them():
    template = BaseChatTemplate()
    assert render_chat(template, HI, template_kwargs={"enable_thinking": False}) == render_chat(template, HI)


def test_chat_template_kwargs_win_over_the_top_level_enable_thinking():
    assert template_variables(None, False) == {"enable_thinking": False}
    assert template_variables({"enable_thinking": True}, False) == {"enable_thinking": True}
    assert template_variables({"enable_thinking": None, "x": 1}, False) == {"enable_thinking": False, "x": 1}
    assert template_variables({}, None) == {}


@pytest.mark.parametrize("kwargs, param, words", [
    ({"messages": []}, "chat_template_kwargs", "may not set messages"),
    ({"add_generation_prompt": False, "bos_token": ""}, "chat_template_kwargs", "add_generation_prompt, bos_token"),
    ({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking", "true or false, got 'no'"),
    ({"enable_thinking": 0}, "chat_template_kwargs.enable_thinking", "got 0"),
    ([1], "chat_template_kwargs", "must be an object"),
])
def test_a_wrong_variable_is_refused_naming_the_field(kwargs, param, words):
    with pytest.raises(InvalidRequestError) as caught:
        template_variables(kwargs, None)
    assert caught.value.param == param and words in caught.value.message
