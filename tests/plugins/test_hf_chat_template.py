import pytest

from lmserve.core.types import InvalidRequestError
from lmserve.plugins.hf_chat_template import JinjaChatTemplate

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文 please 🙂"},
    ],
    [{"role": "user", "content": "  spaces\n\nand\ttabs  "}],
]


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


@pytest.mark.real_model
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers_on_the_real_template(smollm2_gguf, smollm2_hf_tokenizer, messages, add_generation_prompt):
    from lmserve.plugins.tokenizer_files import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(smollm2_gguf)
    template = JinjaChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    expected = smollm2_hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert template.render(messages, add_generation_prompt) == expected
    assert template.stop_words == ("<|im_end|>",)


def test_raise_exception_in_a_template_is_a_bad_request():
    template = JinjaChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


def test_the_sandbox_blocks_attribute_escapes():
    template = JinjaChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError):
        template.render([{"role": "user", "content": "x"}])


def test_tojson_does_not_html_escape():
    template = JinjaChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert template.render([{"role": "user", "content": "<b>&'中"}]) == '"<b>&\'中"'


def test_a_broken_template_fails_at_startup():
    with pytest.raises(ValueError, match="does not parse"):
        JinjaChatTemplate("{% for %}")
