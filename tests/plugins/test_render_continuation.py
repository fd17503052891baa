"""A later turn of an interactive session renders only the new turn.

The invariant: the first turn's prompt + the reply + the continuation of the next
message is exactly what the template renders for the whole conversation. So the
session's tokens equal the whole conversation's prompt, and no system prompt or
BOS appears twice.
"""

import pytest

from lmserve.core.chat_template import render_continuation
from lmserve.core.fields_chat_template import BaseChatTemplate
from lmserve.plugins.hf_chat_template import JinjaChatTemplate

# Jinja templates in the styles models ship: ChatML with a default system prompt
# (SmolLM2, Qwen2.5), Llama 3 (BOS + headers), Mistral ([INST] with BOS once).
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
TEMPLATES = {
    "chatml": JinjaChatTemplate(CHATML_WITH_DEFAULT_SYSTEM, "<|endoftext|>", "<|im_end|>"),
    "llama3": JinjaChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": JinjaChatTemplate(MISTRAL, "<s>", "</s>"),
    "base": BaseChatTemplate(),
}
FIRST = [{"role": "user", "content": "What is the capital of France?"}]
REPLY = "Paris."
NEXT = [{"role": "user", "content": "And of Italy?"}]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_first_turn_reply_and_continuation_make_the_whole_conversation(name):
    template = TEMPLATES[name]
    whole = template.render([*FIRST, {"role": "assistant", "content": REPLY}, *NEXT])
    assert template.render(FIRST) + REPLY + render_continuation(template, NEXT) == whole


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
def test_a_continuation_has_no_system_prompt_and_no_bos(name):
    template = TEMPLATES[name]
    continuation = render_continuation(template, NEXT)
    assert "system" not in continuation and template.bos_token not in continuation
    assert continuation.endswith(template.render(NEXT)[-10:]), "it ends with the assistant's header"


def test_the_continuation_starts_with_the_replys_end_of_turn_mark():
    # The session drops this mark when the model already wrote it (its stop token).
    assert render_continuation(TEMPLATES["chatml"], NEXT).startswith("<|im_end|>\n<|im_start|>user\n")


def test_a_template_may_render_its_own_continuation():
    class Own(BaseChatTemplate):
        def render_continuation(self, messages):
            return "<own>" + messages[0]["content"]

    assert render_continuation(Own(), NEXT) == "<own>And of Italy?"


def test_a_template_that_drops_replies_cannot_continue_a_conversation():
    users_only = JinjaChatTemplate("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                                   "{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="drops earlier replies"):
        render_continuation(users_only, NEXT)


@pytest.mark.real_model
def test_the_real_models_template_continues_like_transformers_renders_the_whole(smollm2_gguf,
                                                                                 hf_smollm2_tokenizer):
    from lmserve.plugins.tokenizer_files import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(smollm2_gguf)
    template = JinjaChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    whole = hf_smollm2_tokenizer.apply_chat_template(
        [*FIRST, {"role": "assistant", "content": REPLY}, *NEXT], tokenize=False, add_generation_prompt=True)
    assert template.render(FIRST) + REPLY + render_continuation(template, NEXT) == whole
