"""Chat templates render OpenAI ``tools``, assistant ``tool_calls`` and ``tool`` messages.

Without any of them ``render_chat`` is exactly ``render``. With them, each of
LMDeploy's tool formats writes its markers and JSON (read back out of the
prompt here and compared with what went in), a template without a format of
its own gets Hermes text, and the model's own Jinja template gets ``tools`` and
calls whose arguments are objects, as transformers' ``apply_chat_template``
gives them. Qwen2.5's Jinja template, copied below, is the reference the
``qwen2.5`` built-in must match character for character.
"""

import json
import re

import pytest

from lmserve.core.chat_template import render_chat, render_continuation, takes_tools
from lmserve.core.fields_chat_template import BaseChatTemplate, FieldsChatTemplate
from lmserve.core.template_choice import ChatTemplateRegistry, DefaultSystemPrompt, with_meta_instruction
from lmserve.core.types import InvalidRequestError
from lmserve.plugins import base_chat_template, chat_templates
from lmserve.plugins.hf_chat_template import JinjaChatTemplate

REGISTRY = ChatTemplateRegistry([*chat_templates.lmserve_chat_templates(), *base_chat_template.lmserve_chat_templates()])
BUILTINS = {template.name: template for template in REGISTRY.templates}

# Qwen2.5-Instruct's chat template (tokenizer_config.json), as the model ships it.
QWEN25_JINJA = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN25_HF = JinjaChatTemplate(QWEN25_JINJA, eos_token="<|im_end|>")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
PARIS = {"city": "Paris"}
LYON = {"city": "Lyon"}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


QUESTION = {"role": "user", "content": "Weather in Paris and Lyon?"}
CALLS = {"role": "assistant", "content": None, "tool_calls": [
    call("c1", "get_weather", json.dumps(PARIS)), call("c2", "get_weather", json.dumps(LYON))]}
RESULTS = [{"role": "tool", "tool_call_id": "c1", "content": "21"}, {"role": "tool", "tool_call_id": "c2", "content": "19"}]
#: A whole exchange: the question, two calls, their results (consecutive), the answer, a new question.
EXCHANGE = [QUESTION, CALLS, *RESULTS, {"role": "assistant", "content": "21 °C and 19 °C."},
            {"role": "user", "content": "And tomorrow?"}]
PLAIN = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hel"}],
]


def a_plugin_template():
    class ToolsAsIs:
        name, stop_words = "as-is", ()

        def render(self, messages, add_generation_prompt=True, tools=None):
            return json.dumps({"messages": messages, "tools": tools})

    return ToolsAsIs()


# ------------------------------------------------------------------- without tools

EVERY_TEMPLATE = {**BUILTINS, "hf": QWEN25_HF, "--meta-instruction over hf": with_meta_instruction(QWEN25_HF, "Be kind."),
                  "--meta-instruction over base": with_meta_instruction(BaseChatTemplate(), "Be kind.")}


@pytest.mark.parametrize("name", list(EVERY_TEMPLATE))
@pytest.mark.parametrize("messages", PLAIN)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_without_tools_render_chat_is_render(name, messages, add_generation_prompt):
    template = EVERY_TEMPLATE[name]
    expected = template.render(messages, add_generation_prompt)
    assert render_chat(template, messages, add_generation_prompt=add_generation_prompt) == expected
    assert render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=[]) == expected


@pytest.mark.parametrize("name", list(EVERY_TEMPLATE))
def test_every_template_renders_the_servers_tool_format_sample(name):
    # The conversation the server renders at startup to pick a tool parser (frontends/http/app.py).
    sample_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    conversation = [{"role": "user", "content": "?"},
                    {"role": "assistant", "content": None, "tool_calls": [call("c", "f", "{}")]},
                    {"role": "tool", "tool_call_id": "c", "content": "!"}]
    rendered = render_chat(EVERY_TEMPLATE[name], conversation, tools=[sample_tool])
    assert '"f"' in rendered and "!" in rendered


def test_a_template_takes_tools_when_its_render_has_a_tools_parameter():
    assert takes_tools(QWEN25_HF) and takes_tools(BUILTINS["vicuna"]) and takes_tools(a_plugin_template())
    assert takes_tools(with_meta_instruction(BaseChatTemplate(), "x"))
    assert not takes_tools(BaseChatTemplate())
    # ...and then gets the messages and tools as they are.
    rendered = json.loads(render_chat(a_plugin_template(), [QUESTION, CALLS], tools=TOOLS))
    assert rendered == {"messages": [QUESTION, CALLS], "tools": TOOLS}


# ------------------------------------------------------------------ hermes (qwen2.5)


def _tools_listed(text: str) -> list[dict]:
    block = re.search(r"<tools>\n(.*?)\n</tools>", text, re.S)[1]
    return [json.loads(line) for line in block.split("\n")]


def _calls_written(text: str) -> list[dict]:
    """The ``<tool_call>`` JSON after the tools' instructions (whose example is no JSON)."""
    return _json_between(text.split("<args-json-object>}\n</tool_call>")[-1], "<tool_call>\n", "\n</tool_call>")


def _json_between(text: str, start: str, end: str) -> list[dict]:
    return [json.loads(found) for found in re.findall(re.escape(start) + r"(.*?)" + re.escape(end), text, re.S)]


@pytest.mark.parametrize("system", [[], [{"role": "system", "content": "Be brief."}]])
def test_qwen25_renders_tools_as_qwen25s_own_jinja_template_does(system):
    messages = [*system, *EXCHANGE]
    expected = QWEN25_HF.render(messages, tools=TOOLS)
    assert render_chat(BUILTINS["qwen2.5"], messages, tools=TOOLS) == expected
    assert render_chat(QWEN25_HF, messages, tools=TOOLS) == expected


def test_qwen25_lists_the_tools_and_writes_calls_and_results():
    text = render_chat(BUILTINS["qwen2.5"], EXCHANGE, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.\n\n# Tools\n\nYou may call one or more functions")
    assert _tools_listed(text) == TOOLS
    assert _calls_written(text) == [
        {"name": "get_weather", "arguments": PARIS}, {"name": "get_weather", "arguments": LYON}]
    assert ("<|im_start|>assistant\n<tool_call>\n" in text), "no content: the first call follows the header"
    # Consecutive results: one user turn.
    assert ("<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n19\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n21 °C and 19 °C.<|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")


def test_a_reply_with_content_and_a_call_keeps_both():
    reply = {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1", "get_time", "{}")]}
    text = render_chat(BUILTINS["qwen2.5"], [QUESTION, reply, RESULTS[0]], tools=TOOLS)
    assert ('<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
            "</tool_call><|im_end|>\n") in text
    assert text == QWEN25_HF.render([QUESTION, reply, RESULTS[0]], tools=TOOLS)


def test_history_with_calls_but_no_tools_renders_the_calls_without_the_tool_list():
    text = render_chat(BUILTINS["qwen2.5"], EXCHANGE)
    assert "# Tools" not in text and "<tool_call>" in text and "<tool_response>" in text
    assert text == QWEN25_HF.render(EXCHANGE)


def test_a_continuation_of_tool_results_follows_the_calls():
    template = BUILTINS["qwen2.5"]
    first = render_chat(template, [QUESTION], tools=TOOLS)
    reply = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    calls = {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_time", "{}")]}
    whole = render_chat(template, [QUESTION, calls, RESULTS[0]], tools=TOOLS)
    assert first + reply + render_continuation(template, [RESULTS[0]]) == whole


# --------------------------------------------------------------------------- internlm2


def test_internlm2_puts_the_tools_in_a_plugin_turn_after_the_system_turn():
    text = render_chat(BUILTINS["internlm2"], EXCHANGE, tools=TOOLS)
    system_end = text.index("<|im_end|>\n") + len("<|im_end|>\n")
    assert text[:system_end].startswith("<|im_start|>system\nYou are an AI assistant whose name is InternLM")
    plugin = re.match(r"<\|im_start\|>system name=<\|plugin\|>\n(.*?)<\|im_end\|>\n", text[system_end:], re.S)
    assert json.loads(plugin[1]) == [tool["function"] for tool in TOOLS]
    assert text[system_end + plugin.end():].startswith("<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n")


def test_internlm2_with_a_system_message_puts_the_plugin_turn_after_it():
    text = render_chat(BUILTINS["internlm2"], [{"role": "system", "content": "Be brief."}, QUESTION], tools=[TIME])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    '<|im_start|>system name=<|plugin|>\n[{"name": "get_time", "parameters": {"type": "object", '
                    '"properties": {}}}]<|im_end|>\n'
                    "<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n<|im_start|>assistant\n")


def test_internlm2_writes_calls_as_actions_and_results_as_the_environment():
    text = render_chat(BUILTINS["internlm2"], EXCHANGE, tools=TOOLS)
    assert _json_between(text, "<|action_start|><|plugin|>\n", "<|action_end|>") == [
        {"name": "get_weather", "parameters": PARIS}, {"name": "get_weather", "parameters": LYON}]
    assert "<|im_start|>assistant\n<|action_start|><|plugin|>\n" in text
    assert ("<|action_end|><|im_end|>\n<|im_start|>environment name=<|plugin|>\n21<|im_end|>\n"
            "<|im_start|>environment name=<|plugin|>\n19<|im_end|>\n<|im_start|>assistant\n21 °C") in text


# ---------------------------------------------------------------------------- llama3.1


LLAMA31_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary "
    "of argument name and its value}. Do not use variables.\n\n")


def test_llama31_puts_the_tools_in_the_first_user_turn():
    text = render_chat(BUILTINS["llama3.1"], EXCHANGE, tools=TOOLS)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + LLAMA31_PREAMBLE)
    user = text.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    *listed, question = user[len(LLAMA31_PREAMBLE):].split("\n\n")  # indented JSON has no blank line
    assert [json.loads(part) for part in listed] == TOOLS and question == "Weather in Paris and Lyon?"
    assert json.dumps(WEATHER, indent=4, ensure_ascii=False) in user, "indented by 4, as Meta's template writes"
    assert text.count(LLAMA31_PREAMBLE) == 1, "the first user turn only"


def test_llama31_keeps_the_system_text_after_the_environment_line():
    text = render_chat(BUILTINS["llama3.1"], [{"role": "system", "content": "Be brief."}, QUESTION], tools=[TIME])
    assert "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nBe brief.<|eot_id|>" in text


def test_llama31_writes_calls_after_the_python_tag_and_results_as_ipython():
    text = render_chat(BUILTINS["llama3.1"], EXCHANGE, tools=TOOLS)
    calls = re.search(r"<\|python_tag\|>(.*?)<\|eot_id\|>", text)[1]
    assert [json.loads(part) for part in calls.split("; ")] == [
        {"name": "get_weather", "parameters": PARIS}, {"name": "get_weather", "parameters": LYON}]
    assert ("<|start_header_id|>ipython<|end_header_id|>\n\n21<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\n19<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n21 °C and 19 °C.<|eot_id|>") in text


def test_llama31_needs_a_user_message_for_the_tools():
    with pytest.raises(InvalidRequestError) as error:
        render_chat(BUILTINS["llama3.1"], [{"role": "system", "content": "Be brief."}], tools=[TIME])
    assert error.value.param == "messages"


@pytest.mark.parametrize("model, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1"),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1"),
    ("someone/llama3.1-finetune", "llama3.1"),
    ("someone/Llama-3_1-8B-GGUF", "llama3.1"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
    ("someone/llama3-8b-chat", "llama3"),
])
def test_llama31_names_get_llama31_and_llama3_keeps_its_own(model, expected):
    assert REGISTRY.match(model).name == expected


def test_llama31_is_llama3_with_its_tool_format():
    llama3, llama31 = BUILTINS["llama3"], BUILTINS["llama3.1"]
    assert REGISTRY.get("llama3_1") is llama31 and llama31.tool_format == "llama3.1"
    for messages in PLAIN:
        assert llama31.render(messages) == llama3.render(messages)


# ---------------------------------------------------------------- the generic fallback


@pytest.mark.parametrize("template", [BUILTINS["vicuna"], BUILTINS["chatml"], BaseChatTemplate()],
                         ids=["vicuna", "chatml", "base"])
def test_a_template_without_a_tool_format_gets_hermes_text(template):
    text = render_chat(template, EXCHANGE, tools=TOOLS)
    assert "# Tools" in text and _tools_listed(text) == TOOLS
    assert _calls_written(text) == [
        {"name": "get_weather", "arguments": PARIS}, {"name": "get_weather", "arguments": LYON}]
    assert "<tool_response>\n21\n</tool_response>\n<tool_response>\n19\n</tool_response>" in text


def test_the_fallback_follows_the_default_system_prompt_and_merges_results_into_a_user_turn():
    text = render_chat(BUILTINS["vicuna"], EXCHANGE, tools=[TIME])
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions.\n\n# Tools\n\n")
    assert ("</tool_call></s>USER: <tool_response>\n21\n</tool_response>\n<tool_response>\n19\n</tool_response> "
            "ASSISTANT: 21 °C and 19 °C.</s>") in text


def test_the_fallback_without_a_default_system_prompt_adds_a_system_message():
    text = render_chat(BUILTINS["chatml"], [QUESTION], tools=[TIME])
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_a_json_template_with_a_tool_box_keeps_tool_messages_in_it():
    template = REGISTRY.from_json(json.dumps({"model_name": "boxed", "user": "U:", "eoh": "\n", "assistant": "A:",
                                              "eoa": "\n", "tool": "T:", "eotool": "\n", "meta_instruction": None}))
    text = render_chat(template, [QUESTION, CALLS, RESULTS[0]])
    assert text.endswith("</tool_call>\nT:21\nA:")


# ------------------------------------------------------------------------ the hf template


def test_jinja_gets_the_tools_and_calls_with_arguments_as_objects():
    template = JinjaChatTemplate("{{ tools | tojson }}|{% for m in messages %}{% for c in m.tool_calls or [] %}"
                                 "{{ c.id }}:{{ c.function.name }}:{{ c.function.arguments.city }};{% endfor %}"
                                 "{{ m.content }}|{% endfor %}")
    text = render_chat(template, [QUESTION, CALLS], tools=[WEATHER])
    assert text == f"{json.dumps([WEATHER], ensure_ascii=False)}|Weather in Paris and Lyon?|c1:get_weather:Paris;" \
                   "c2:get_weather:Lyon;None|"


def test_jinja_without_tools_gets_none_as_transformers_gives_it():
    template = JinjaChatTemplate("{{ tools is none }}")
    assert template.render([QUESTION]) == "True"


def test_jinja_does_not_change_the_callers_messages():
    messages = [QUESTION, CALLS]
    render_chat(QWEN25_HF, messages, tools=TOOLS)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == json.dumps(PARIS)


# ------------------------------------------------------------------ --meta-instruction


def test_meta_instruction_over_a_jinja_template_forwards_the_tools():
    template = with_meta_instruction(QWEN25_HF, "Be kind.")
    assert isinstance(template, DefaultSystemPrompt)
    text = render_chat(template, EXCHANGE, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe kind.\n\n# Tools\n\n")
    assert text == QWEN25_HF.render([{"role": "system", "content": "Be kind."}, *EXCHANGE], tools=TOOLS)


def test_meta_instruction_over_a_template_without_tools_gets_the_fallback_after_it():
    text = render_chat(with_meta_instruction(BaseChatTemplate(), "Be kind."), [QUESTION], tools=[TIME])
    assert text.startswith("Be kind.\n\n# Tools\n\n") and text.endswith("</tool_call>Weather in Paris and Lyon?")


def test_meta_instruction_of_a_fields_template_is_the_system_text_of_the_tools():
    text = render_chat(with_meta_instruction(BUILTINS["qwen2.5"], "Be kind."), [QUESTION], tools=[TIME])
    assert text.startswith("<|im_start|>system\nBe kind.\n\n# Tools\n\n")


# ---------------------------------------------------------------------- bad arguments

BAD_ARGUMENTS = ["{not json", "[1, 2]", '"Paris"', "null"]


@pytest.mark.parametrize("name", list(EVERY_TEMPLATE))
@pytest.mark.parametrize("arguments", BAD_ARGUMENTS)
def test_arguments_that_are_not_a_json_object_are_a_bad_request(name, arguments):
    messages = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", arguments)]}]
    with pytest.raises(InvalidRequestError, match="get_weather") as error:
        render_chat(EVERY_TEMPLATE[name], messages, tools=TOOLS)
    assert error.value.param == "messages"


def test_a_malformed_call_is_a_bad_request():
    messages = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]
    with pytest.raises(InvalidRequestError) as error:
        render_chat(BUILTINS["qwen2.5"], messages)
    assert error.value.param == "messages"


def test_an_unknown_tool_format_fails_when_the_template_is_made():
    with pytest.raises(ValueError, match="tool_format must be None or one of hermes, internlm2, llama3.1"):
        FieldsChatTemplate("x", tool_format="xml")


def test_a_jinja_template_that_never_reads_tools_gets_them_as_hermes_text():
    """SmolLM2's template, like most older ones, has no ``tools``: render_chat writes them in."""
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = JinjaChatTemplate(chatml, eos_token="<|im_end|>")
    assert template.renders_tools is False and QWEN25_HF.renders_tools is True
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    text = render_chat(template, messages, tools=[tool])
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(tool) in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
