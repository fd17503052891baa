"""The built-in reasoning parser, through the plugin manager, on the prompts real
thinking models' templates render and with tool calls after the thinking.

The templates below are written after Qwen3's (the model opens ``<think>`` itself;
``enable_thinking: false`` renders an empty, closed one) and the DeepSeek-R1
distills' (the generation prompt opens ``<think>\\n``); they are rendered by the
``hf`` template and tokenized, and the parser reads the prompt's decoded end, as
the server does.
"""

import itertools
import json

import pytest

from lmserve.core import hookimpl
from lmserve.core.plugins import create_plugin_manager
from lmserve.core.reasoning import PROMPT_END_TOKENS, ReasoningParser, ReasoningReader, choose_reasoning_parser
from lmserve.plugins.hf_chat_template import JinjaChatTemplate
from lmserve.plugins.reasoning_parsers import BUILTIN_REASONING_PARSERS, ThinkTagReasoningParser
from lmserve.plugins.tiny_model import tokenizer_json, write_tiny_tokenizer
from lmserve.plugins.tokenizer_files import tokenizer_from_hf_dir
from lmserve.plugins.tool_parsers import HermesToolParser

QWEN3_LIKE = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
R1_DISTILL_LIKE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
SMOLLM2_LIKE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 2+2? " * 20}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(directory)
    return tokenizer_from_hf_dir(directory)


def prompt_end_opens(template_source: str, tokenizer, **variables) -> bool:
    """Whether the server's parser starts an output of this template's prompt inside the reasoning."""
    source = template_source
    if variables:  # the test's own way to set a template variable, whatever renders kwargs
        source = "".join(f"{{% set {name} = {json.dumps(value)} %}}" for name, value in variables.items()) + source
    prompt = JinjaChatTemplate(source).render(MESSAGES, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_bos=False)
    assert len(ids) > PROMPT_END_TOKENS  # the parser reads the end only
    return ReasoningReader.for_prompt(ThinkTagReasoningParser, tokenizer, ids).parser.starts_in_reasoning


def test_a_template_that_opens_think_starts_the_output_in_the_reasoning(tokenizer):
    assert prompt_end_opens(R1_DISTILL_LIKE, tokenizer)


def test_a_qwen3_prompt_starts_outside_with_thinking_on_and_off(tokenizer):
    assert not prompt_end_opens(QWEN3_LIKE, tokenizer)
    assert not prompt_end_opens(QWEN3_LIKE, tokenizer, enable_thinking=False)


@pytest.mark.parametrize("template, chosen", [
    (QWEN3_LIKE, ThinkTagReasoningParser), (R1_DISTILL_LIKE, ThinkTagReasoningParser), (SMOLLM2_LIKE, None)])
def test_without_a_name_the_parser_is_the_one_whose_tags_the_template_writes(template, chosen):
    assert choose_reasoning_parser(BUILTIN_REASONING_PARSERS, None, template) is chosen


@pytest.mark.parametrize("name", ["default", "qwen-qwq", "deepseek-r1", "intern-s1", "qwen3", "deepseek_r1",
                                  "think", "deepseek-v3", "deepseek-v3.2", "deepseek-v32", "DEFAULT"])
def test_lmdeploys_names_and_ours_all_name_the_default_parser(name):
    assert choose_reasoning_parser(BUILTIN_REASONING_PARSERS, name, "") is ThinkTagReasoningParser


def test_an_unknown_name_lists_the_builtin_names():
    with pytest.raises(ValueError, match=r"Unknown reasoning parser 'nonsense'; known: default \(think, qwen3, "
                                         r"qwen-qwq, .*\), none\."):
        choose_reasoning_parser(BUILTIN_REASONING_PARSERS, "nonsense", "")


def test_tags_that_are_special_tokens_make_outputs_keep_their_special_tokens(tmp_path, tokenizer):
    assert not ThinkTagReasoningParser.keeps_special_tokens(tokenizer)  # <think> is plain text here
    write_tiny_tokenizer(tmp_path)  # then the same vocabulary with <think> and </think> as special tokens
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    added = [(token["id"], token["content"]) for token in spec["added_tokens"]]
    added += [(len(vocab), "<think>"), (len(vocab) + 1, "</think>")]
    vocab.update({content: token_id for token_id, content in added})
    merges = [tuple(merge.split(" ", 1)) for merge in spec["model"]["merges"]]
    document = tokenizer_json(vocab, merges, added)
    (tmp_path / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False))
    special = tokenizer_from_hf_dir(tmp_path)
    assert special.decode(special.encode("<think>a</think>", add_bos=False), skip_special_tokens=True) == "a"
    assert ThinkTagReasoningParser.keeps_special_tokens(special)


# ------------------------------------------------------------- tools after thinking


OUTPUT = ('<think>\nThe user wants the time; I call <tool_call> get_time.\n</think>\n\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')


def read_streamed(pieces: list[str], prompt_end: str) -> tuple[str, str, dict[int, dict]]:
    """The reasoning, the content and the calls of a stream: the reasoning parser first,
    the Hermes parser fed only the content, as the server chains them."""
    reasoning_parser, tool_parser = ThinkTagReasoningParser(prompt_end), HermesToolParser()
    reasoning, content, calls = "", "", {}

    def take(new_content: str, deltas) -> None:
        nonlocal content
        content += new_content
        for delta in deltas:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.name or ""
            call["arguments"] += delta.arguments

    for piece in [*pieces, None]:
        r, c = reasoning_parser.flush() if piece is None else reasoning_parser.feed(piece)
        reasoning += r
        take(*tool_parser.feed(c))
    take(*tool_parser.flush())
    return reasoning, content, calls


def test_a_tool_call_after_the_thinking_is_read_from_the_content_only():
    reasoning, content = ThinkTagReasoningParser("").parse(OUTPUT)
    assert reasoning == "\nThe user wants the time; I call <tool_call> get_time.\n"
    parsed = HermesToolParser().parse(content)
    assert parsed.content == ""
    assert [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls] == [("get_time", {"zone": "UTC"})]


def test_a_tool_call_after_the_thinking_streamed_in_any_pieces_reads_the_same():
    expected_reasoning = "\nThe user wants the time; I call <tool_call> get_time.\n"
    cuts = [[OUTPUT[:i], OUTPUT[i:]] for i in range(len(OUTPUT) + 1)]
    step = 7  # three pieces: every first cut, a spread of second cuts
    cuts += [[OUTPUT[:i], OUTPUT[i:j], OUTPUT[j:]]
             for i, j in itertools.combinations(range(0, len(OUTPUT) + 1), 2) if (j - i) % step == 0 or j - i < 12]
    for pieces in cuts:
        reasoning, content, calls = read_streamed(pieces, "")
        assert reasoning == expected_reasoning, pieces
        assert content.strip() == "", pieces
        assert [(call["name"], json.loads(call["arguments"])) for call in calls.values()] == [
            ("get_time", {"zone": "UTC"})], pieces


def test_a_call_written_inside_the_reasoning_is_no_call():
    reasoning, content, calls = read_streamed(
        ['x <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', " y"], "<think>")
    assert calls == {} and content == "" and "get_time" in reasoning


# --------------------------------------------------------------------- the plugin


def test_the_hook_contributes_the_builtin_through_the_plugin_manager():
    pm = create_plugin_manager(load_entry_points=False)
    parsers = [parser for contributed in pm.hook.lmserve_reasoning_parsers() for parser in contributed]
    assert parsers == list(BUILTIN_REASONING_PARSERS) == [ThinkTagReasoningParser]
    assert (parsers[0].name, parsers[0].open_tag, parsers[0].close_tag) == ("default", "<think>", "</think>")


def test_a_plugins_parser_is_tried_before_the_builtin():
    class SeedThink(ReasoningParser):
        name = "seed"
        open_tag, close_tag = "<seed:think>", "</seed:think>"

    class Plugin:
        @hookimpl
        def lmserve_reasoning_parsers(self):
            return [SeedThink]

    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Plugin(), name="seed-plugin")
    try:
        parsers = [parser for contributed in pm.hook.lmserve_reasoning_parsers() for parser in contributed]
    finally:
        pm.unregister(name="seed-plugin")
    assert parsers == [SeedThink, ThinkTagReasoningParser]
    assert choose_reasoning_parser(parsers, None, "<seed:think></seed:think> <think></think>") is SeedThink
    assert choose_reasoning_parser(parsers, None, "<think></think>") is ThinkTagReasoningParser
    assert SeedThink("").parse("<seed:think>a</seed:think>b") == ("a", "b")
