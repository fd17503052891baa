"""The built-in chat templates render LMDeploy's prompts, string for string.

Every expected string below is written out from the format's documentation
(LMDeploy 0.9's ``lmdeploy/model.py``): the whole conversation (system, user,
assistant, user, then the generation prompt) and the continuation a later
interactive turn sends. The continuation starts with the reply's end-of-turn
mark (``eoa + separator``): LMDeploy's later-turn prompt is what follows it.
"""

import json

import pytest

from conftest import LMDEPLOY_DOC_JSON
from lmserve.core.chat_template import render_continuation
from lmserve.core.fields_chat_template import BaseChatTemplate, FieldsChatTemplate
from lmserve.core.plugins import PluginError, create_plugin_manager
from lmserve.core.template_choice import ChatTemplateRegistry, DefaultSystemPrompt, with_meta_instruction
from lmserve.core.types import InvalidRequestError
from lmserve.plugins.chat_templates import BUILTIN_TEMPLATES
from lmserve.plugins.hf_chat_template import JinjaChatTemplate

BUILTINS = {template.name: template for template in BUILTIN_TEMPLATES}
WHOLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
]
FIRST, REPLY, NEXT = WHOLE[:2], WHOLE[2]["content"], WHOLE[3:]

INTERNLM_META = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.\n"
)
LLAMA2_META = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
CHATML_WHOLE = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"
)
CHATML_CONTINUATION = "<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"

# name: (whole conversation, continuation with NEXT, a lone user turn without a system message)
GOLDEN = {
    "chatml": (CHATML_WHOLE, CHATML_CONTINUATION, "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"),
    "qwen": (
        CHATML_WHOLE, CHATML_CONTINUATION,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen2.5": (
        CHATML_WHOLE, CHATML_CONTINUATION,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    ),
    "internlm2": (
        CHATML_WHOLE, CHATML_CONTINUATION,
        f"<|im_start|>system\n{INTERNLM_META}<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama2": (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello.</s><s>[INST] Bye? [/INST] ",
        "</s><s>[INST] Bye? [/INST] ",
        f"[INST] <<SYS>>\n{LLAMA2_META}\n<</SYS>>\n\nHi! [/INST] ",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama3.1": None,  # filled below: llama3's fields, its tool format aside
    "mistral": (
        "Be brief.[INST] Hi! [/INST]Hello.</s>[INST] Bye? [/INST]",
        "</s>[INST] Bye? [/INST]",
        "[INST] Hi! [/INST]",
    ),
    "vicuna": (
        "Be brief. USER: Hi! ASSISTANT: Hello.</s>USER: Bye? ASSISTANT:",
        "</s>USER: Bye? ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi! ASSISTANT:",
    ),
}
GOLDEN["llama3.1"] = GOLDEN["llama3"]
STOP_WORDS = {
    "chatml": ("<|im_end|>",), "qwen": ("<|im_end|>",), "qwen2.5": ("<|im_end|>",),
    "internlm2": ("<|im_end|>", "<|action_end|>"), "llama2": (), "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "llama3.1": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"), "mistral": (), "vicuna": ("</s>",),
}
#: What the model writes of a reply, where the generation prompt leaves part of the header to it.
WRITTEN_REPLY = {"vicuna": " " + REPLY}  # LMDeploy's vicuna prompt ends "ASSISTANT:", without the space


def test_every_builtin_has_golden_strings():
    assert sorted(BUILTINS) == sorted(GOLDEN)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_the_whole_conversation(name):
    assert BUILTINS[name].render(WHOLE) == GOLDEN[name][0]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_the_continuation(name):
    assert render_continuation(BUILTINS[name], NEXT) == GOLDEN[name][1]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_the_default_system_prompt_when_the_conversation_has_none(name):
    assert BUILTINS[name].render(WHOLE[1:2]) == GOLDEN[name][2]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_stop_words(name):
    assert BUILTINS[name].stop_words == STOP_WORDS[name]


TEMPLATES = {
    **BUILTINS,
    "base": BaseChatTemplate(),
    "hf": JinjaChatTemplate(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        eos_token="<|im_end|>",
    ),
    "--meta-instruction over hf": None,  # filled below: the wrapper any kind gets
}
TEMPLATES["--meta-instruction over hf"] = with_meta_instruction(TEMPLATES["hf"], "Be kind.")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_first_turn_reply_and_continuation_make_the_whole_conversation(name):
    template = TEMPLATES[name]
    reply = WRITTEN_REPLY.get(name, REPLY)
    assert template.render(FIRST) + reply + render_continuation(template, NEXT) == template.render(WHOLE)


@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "mistral"])
def test_a_conversation_ending_with_a_reply_is_a_prefix_to_continue(name):
    # LMDeploy: the reply's eoa + separator is left off, and no header follows.
    template = BUILTINS[name]
    prefix = template.render(WHOLE[:3])
    assert prefix.endswith("Hello.") and template.render(WHOLE).startswith(prefix)


def test_without_the_generation_prompt_no_assistant_header_follows():
    assert BUILTINS["qwen"].render(FIRST, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n")


def test_an_unknown_role_is_a_bad_request():
    with pytest.raises(InvalidRequestError, match="no role 'critic'"):
        BUILTINS["qwen"].render([{"role": "critic", "content": "x"}])


class _Tokenizer:
    def __init__(self, bos_token, add_bos_token):
        self.bos_token, self.add_bos_token = bos_token, add_bos_token


def test_the_bos_a_tokenizer_adds_is_written_once_before_the_conversation():
    # LMDeploy encodes a first prompt with the tokenizer's special tokens; lmserve encodes the text as it is.
    llama2 = BUILTINS["llama2"].with_tokenizer_bos(_Tokenizer("<s>", add_bos_token=True))
    assert llama2.render(WHOLE) == "<s>" + GOLDEN["llama2"][0]
    assert render_continuation(llama2, NEXT) == GOLDEN["llama2"][1]
    llama3 = BUILTINS["llama3"].with_tokenizer_bos(_Tokenizer("<|begin_of_text|>", add_bos_token=True))
    assert llama3.render(WHOLE) == GOLDEN["llama3"][0]
    assert BUILTINS["qwen"].with_tokenizer_bos(_Tokenizer("<|endoftext|>", add_bos_token=False)) is BUILTINS["qwen"]


def test_completion_capability_leaves_the_prompt_as_it_is():
    template = FieldsChatTemplate("raw", user="U:", capability="completion")
    assert template.render([{"role": "user", "content": "1 + 1 ="}]) == "1 + 1 ="


# --------------------------------------------------------------------------- matching

MATCHES = {
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5",
    "my-qwen2_5-finetune": "qwen",  # LMDeploy's qwen rule only excludes 'qwen2.5', and qwen comes first
    "Qwen/Qwen2.5-VL-7B-Instruct": None,  # neither: qwen excludes 'qwen2.5', qwen2.5 excludes 'vl'
    "Qwen/Qwen-7B-Chat": "qwen",
    "internlm/internlm2-chat-7b": "internlm2",
    "internlm/internlm2-7b": None,
    "meta-llama/Llama-2-7b-chat-hf": "llama2",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama3.1",
    "meta-llama/Llama-3.1-70B-Instruct": "llama3.1",
    "my-llama3.1-finetune": "llama3.1",
    "unsloth/llama-3_1-8b-instruct": "llama3.1",
    "OpenGVLab/InternVL2-Llama3-76B": None,
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral",
    "mistralai/Mistral-7B-v0.1": None,
    "lmsys/vicuna-7b-v1.5": "vicuna",
    "liuhaotian/llava-v1.5-vicuna": None,
    "HuggingFaceTB/SmolLM2-135M-Instruct": None,
}


@pytest.mark.parametrize("model", list(MATCHES))
def test_the_first_matching_template_follows_lmdeploys_rules(model):
    matched = ChatTemplateRegistry(BUILTIN_TEMPLATES).match(model)
    assert (matched.name if matched else None) == MATCHES[model]


def test_the_registry_has_every_builtin_by_name_and_alias():
    registry = ChatTemplateRegistry.from_plugins(create_plugin_manager(load_entry_points=False))
    assert registry.names == ["hf", "chatml", "vicuna", "internlm2", "llama2", "llama3.1", "llama3_1", "llama3",
                              "qwen", "qwen2.5", "qwen2d5", "mistral", "mixtral", "base"]
    assert registry.get("qwen2d5") is registry.get("qwen2.5")


def test_two_templates_of_one_name_fail_at_startup():
    with pytest.raises(PluginError, match="Two chat templates are named 'qwen'"):
        ChatTemplateRegistry([*BUILTIN_TEMPLATES, FieldsChatTemplate("qwen")])
    with pytest.raises(PluginError, match="'hf'"):
        ChatTemplateRegistry([FieldsChatTemplate("hf")])


# ------------------------------------------------------------------------------ JSON

ROBOT_PROMPT = ("<|im_start|>system\nYou are a robot developed by LMDeploy.<|im_end|>\n"
                "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
REGISTRY = ChatTemplateRegistry([*BUILTIN_TEMPLATES, BaseChatTemplate()])


def test_lmdeploys_documented_json_from_a_file(tmp_path):
    path = tmp_path / "template.json"
    path.write_text(json.dumps(LMDEPLOY_DOC_JSON))
    template = REGISTRY.from_json(str(path))
    assert template.name == "lmdeploy-robot" and template.stop_words == ("<|im_end|>",)
    assert template.render(WHOLE[1:2]) == ROBOT_PROMPT
    assert render_continuation(template, NEXT) == CHATML_CONTINUATION


def test_lmdeploys_documented_json_as_a_string():
    assert REGISTRY.from_json(json.dumps(LMDEPLOY_DOC_JSON)).render(WHOLE[1:2]) == ROBOT_PROMPT


def test_a_known_name_overrides_only_the_fields_given():
    template = REGISTRY.from_json('{"model_name": "qwen2d5", "meta_instruction": "Be a robot."}')
    assert template.name == "qwen2.5"
    assert template.render(WHOLE[1:2]) == ("<|im_start|>system\nBe a robot.<|im_end|>\n"
                                           "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_a_missing_name_is_generated_and_null_keeps_a_default():
    template = REGISTRY.from_json('{"user": "Q: ", "eoh": "\\n", "assistant": "A: ", "meta_instruction": null}')
    assert template.name.startswith("custom-")
    # LMDeploy's BaseChatTemplate: every field defaults to "", meta_instruction included.
    assert template.render([{"role": "user", "content": "2+2?"}]) == "Q: 2+2?\nA: "


@pytest.mark.parametrize("text, error", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be an object"),
    ('{"model_name": "x", "roles": {}}', "unknown field"),
    ('{"stop_words": "<|im_end|>"}', "stop_words must be a list of strings"),
    ('{"capability": "poetry"}', "capability must be one of"),
    ('{"model_name": "base", "user": "U"}', "not made of LMDeploy's fields"),
])
def test_bad_json_is_a_clear_error(text, error):
    with pytest.raises(ValueError, match=error):
        REGISTRY.from_json(text)


# --------------------------------------------------------------- --meta-instruction


def test_meta_instruction_sets_a_fields_templates_default_system_prompt():
    template = with_meta_instruction(BUILTINS["llama3"], "Be a pirate.")
    assert template.render(WHOLE[1:2]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe a pirate.<|eot_id|>")
    assert template.render(WHOLE).startswith(GOLDEN["llama3"][0][:60]), "a system message still wins"


def test_meta_instruction_puts_a_system_message_first_for_other_kinds():
    template = with_meta_instruction(TEMPLATES["hf"], "Be kind.")
    assert isinstance(template, DefaultSystemPrompt) and template.name == "hf"
    assert template.render(WHOLE[1:2]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
    assert template.render(WHOLE) == TEMPLATES["hf"].render(WHOLE)
    assert "Be kind." not in render_continuation(template, NEXT)


# ------------------------------------------------------------------ hf, the real model


@pytest.mark.real_model
def test_hf_renders_the_whole_conversation_like_transformers(smollm2_gguf, hf_smollm2_tokenizer):
    from lmserve.plugins.tokenizer_files import tokenizer_from_gguf
    from lmserve.plugins.hf_chat_template import model_chat_template

    template = model_chat_template(tokenizer_from_gguf(smollm2_gguf))
    expected = hf_smollm2_tokenizer.apply_chat_template(WHOLE, tokenize=False, add_generation_prompt=True)
    assert template.render(WHOLE) == expected
    first = hf_smollm2_tokenizer.apply_chat_template(FIRST, tokenize=False, add_generation_prompt=True)
    assert first + REPLY + render_continuation(template, NEXT) == expected
