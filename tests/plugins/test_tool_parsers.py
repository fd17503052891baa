"""The built-in tool-call parsers read what models write, whole and streamed.

Each output below is written by hand in its model's format. Read whole, it gives
the calls and the content around them; fed in pieces of every size from 1 to 7
characters and at random split points, it gives the same content and the same
calls as OpenAI-style deltas: one first piece per call with its id and name,
then arguments text that joins into the call's arguments JSON. Text that is not
a well-formed call stays content, unchanged.
"""

import json
import random
import re

import pytest

from lmserve.core import hookimpl
from lmserve.core.plugins import create_plugin_manager
from lmserve.core.tool_calls import ParsedToolCallDelta, ToolParser, choose_tool_parser, new_tool_call_id
from lmserve.plugins.chat_templates import BUILTIN_TEMPLATES
from lmserve.plugins.json_calls import JsonValueScanner
from lmserve.plugins.tool_parsers import (
    HermesToolParser,
    InternLMToolParser,
    JsonArrayToolParser,
    Llama3JsonToolParser,
)

BUILTIN = [HermesToolParser, Llama3JsonToolParser, InternLMToolParser, JsonArrayToolParser]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")

# Arguments whose strings hold what a careless reader trips on: braces and brackets,
# quotes and escaped quotes, a backslash before a closing quote, every format's markers.
TRICKY = {
    "code": 'if (a) { return "}"; } else { x = [1, "]"]; }',
    "quote": 'she said "hi" \\ and left',
    "path": "C:\\dir\\",
    "markers": "<tool_call> </tool_call> <|python_tag|> <|action_start|><|plugin|> <|action_end|> ; , ] [",
    "nested": {"list": [1, [2, {"deep": "]}"}]], "empty": {}, "none": None, "yes": True, "pi": -3.5e2},
    "unicode": "héllo ✓ 你好",
}
WEATHER = {"city": "Paris", "unit": "celsius"}


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def hermes(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def llama3(name: str, arguments: dict) -> str:
    return dumps({"name": name, "parameters": arguments})


def internlm(name: str, arguments: dict) -> str:
    return f"<|action_start|><|plugin|>\n{dumps({'name': name, 'parameters': arguments})}<|action_end|>"


def json_calls(*calls: tuple[str, dict]) -> str:
    return dumps([{"name": name, "parameters": arguments} for name, arguments in calls])


# (parser, output, content, calls): well-formed outputs, read whole and streamed alike.
WELL_FORMED = [
    (HermesToolParser, hermes("get_weather", WEATHER), "", [("get_weather", WEATHER)]),
    (HermesToolParser, hermes("get_weather", WEATHER) + "\n" + hermes("get_time", {"zone": "CET"}) + "\n",
     "", [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]),
    (HermesToolParser, "Let me look that up.\n" + hermes("get_weather", WEATHER),
     "Let me look that up.", [("get_weather", WEATHER)]),
    (HermesToolParser, "First.\n" + hermes("a", {}) + "\nThen some words <b>bold</b>.\n" + hermes("b", {"x": 1}),
     "First.\n\nThen some words <b>bold</b>.", [("a", {}), ("b", {"x": 1})]),
    (HermesToolParser, hermes("run", TRICKY), "", [("run", TRICKY)]),
    (HermesToolParser, '<tool_call>\n{"arguments": {"k": "v"}, "name": "later"}\n</tool_call>',
     "", [("later", {"k": "v"})]),
    (HermesToolParser, '<tool_call>{"type": "function", "id": 7, "ok": true, "x": [1, {"y": "}"}], '
     '"name": "f", "arguments": {"a": null}}</tool_call>', "", [("f", {"a": None})]),
    (HermesToolParser, '<tool_call>\n{"name": "no_arguments"}\n</tool_call>', "", [("no_arguments", {})]),
    (HermesToolParser, '<tool_call>\n{"name": "ascii", "arguments": {"s": "caf\\u00e9 \\"q\\""}}\n</tool_call>',
     "", [("ascii", {"s": 'café "q"'})]),
    (HermesToolParser, hermes("unfinished_tail", WEATHER).removesuffix("call>"), "", [("unfinished_tail", WEATHER)]),
    (HermesToolParser, hermes("no_end_marker", WEATHER).removesuffix("</tool_call>"), "", [("no_end_marker", WEATHER)]),
    (Llama3JsonToolParser, "<|python_tag|>" + llama3("get_weather", WEATHER), "", [("get_weather", WEATHER)]),
    (Llama3JsonToolParser, "  \n" + llama3("get_weather", WEATHER), "", [("get_weather", WEATHER)]),
    (Llama3JsonToolParser, "<|python_tag|>" + llama3("a", {"x": 1}) + "; " + llama3("b", TRICKY),
     "", [("a", {"x": 1}), ("b", TRICKY)]),
    (Llama3JsonToolParser, llama3("a", {}) + ";" + llama3("b", {}) + ";", "", [("a", {}), ("b", {})]),
    (Llama3JsonToolParser, '{"name": "with_arguments_key", "arguments": {"q": "x"}}',
     "", [("with_arguments_key", {"q": "x"})]),
    (Llama3JsonToolParser, "I will check. <|python_tag|>" + llama3("get_weather", WEATHER),
     "I will check.", [("get_weather", WEATHER)]),
    (InternLMToolParser, internlm("search", {"query": "lmserve"}), "", [("search", {"query": "lmserve"})]),
    (InternLMToolParser, "Let me search.\n" + internlm("search", TRICKY) + internlm("b", {}) + "\n",
     "Let me search.", [("search", TRICKY), ("b", {})]),
    (InternLMToolParser, '<|action_start|><|plugin|>\n{"name": "f", "arguments": {"a": 1}}<|action_end|>',
     "", [("f", {"a": 1})]),
    (JsonArrayToolParser, json_calls(("get_weather", WEATHER)), "", [("get_weather", WEATHER)]),
    (JsonArrayToolParser, json_calls(("a", {"x": 1}), ("b", TRICKY), ("c", {})),
     "", [("a", {"x": 1}), ("b", TRICKY), ("c", {})]),
    (JsonArrayToolParser, '[\n  {"name": "a", "parameters": {}},\n  {"name": "b", "parameters": {"y": "]"}}\n]\n',
     "", [("a", {}), ("b", {"y": "]"})]),
]

# Outputs with no call to read: all content, unchanged, whole and streamed.
NOT_CALLS = [
    (HermesToolParser, "Just an answer, no tools needed."),
    (HermesToolParser, "Write <tool_call> tags around calls; <tool_ is a prefix."),
    (HermesToolParser, '<tool_call>\n{bad json}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n["name", "f"]\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"nam'),
    (HermesToolParser, ""),
    (Llama3JsonToolParser, "The answer is {x}."),
    (Llama3JsonToolParser, '{"answer": 42, "name_of_it": "x"}'),
    (Llama3JsonToolParser, "Hello"),
    (Llama3JsonToolParser, "<|python_tag|>print('hi')"),
    (InternLMToolParser, "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"),
    (InternLMToolParser, "Plain words with <|action and more."),
    (JsonArrayToolParser, "[]"),
    (JsonArrayToolParser, "[1, 2]"),
    (JsonArrayToolParser, "hello"),
]

# Calls whose JSON is malformed after the name: read whole, all content.
MALFORMED = [
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'),
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2'),
    (Llama3JsonToolParser, '{"name": "f", "parameters": {"a": 1}'),
    (InternLMToolParser, '<|action_start|><|plugin|>\n{"name": "f", "parameters": {"a" 1}}<|action_end|>'),
    (JsonArrayToolParser, '[{"name": "f", "parameters": {"a": 1}'),
]


def _case_id(case) -> str:
    return f"{case[0].name}-{case[1][:40]!r}"


def split_every(text: str, size: int) -> list[str]:
    return [text[start:start + size] for start in range(0, len(text), size)]


def split_randomly(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]


def splits(text: str) -> list[list[str]]:
    return [split_every(text, size) for size in range(1, 8)] + [split_randomly(text, seed) for seed in range(10)]


def stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ParsedToolCallDelta]]:
    content, deltas = [], []
    for piece in [*pieces, None]:
        text, found = parser.flush() if piece is None else parser.feed(piece)
        assert isinstance(text, str) and all(isinstance(delta, ParsedToolCallDelta) for delta in found)
        content.append(text)
        deltas.extend(found)
    return "".join(content), deltas


def streamed_calls(deltas: list[ParsedToolCallDelta]) -> list[tuple[str, str, str]]:
    """(id, name, arguments text) per call, checking the deltas' shape on the way:
    calls in index order 0, 1, 2...; each call's first delta, and only that one,
    carries its id and name."""
    calls: list[list[str]] = []
    for delta in deltas:
        if delta.index == len(calls):  # a new call
            assert delta.id is not None and delta.name, f"the first delta of call {delta.index} is {delta}"
            calls.append([delta.id, delta.name, delta.arguments])
        else:
            assert delta.index == len(calls) - 1, f"delta for call {delta.index} after call {len(calls) - 1}"
            assert delta.id is None and delta.name is None, f"a later delta repeats the id or name: {delta}"
            calls[-1][2] += delta.arguments
    return [tuple(call) for call in calls]


# ------------------------------------------------------------------------- whole


@pytest.mark.parametrize("case", WELL_FORMED, ids=_case_id)
def test_a_whole_output_gives_its_calls_and_the_content_around_them(case):
    parser_class, output, content, calls = case
    parsed = parser_class().parse(output)
    assert parsed.content == content
    assert [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls] == calls
    assert all(call.arguments == dumps(json.loads(call.arguments)) for call in parsed.tool_calls)


@pytest.mark.parametrize("case", NOT_CALLS + MALFORMED, ids=_case_id)
def test_an_output_without_a_well_formed_call_is_all_content_unchanged(case):
    parser_class, output = case
    parsed = parser_class().parse(output)
    assert parsed.content == output and parsed.tool_calls == ()


def test_a_malformed_call_beside_a_good_one_stays_content():
    bad = '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>'
    parsed = HermesToolParser().parse(f"{bad}\n{hermes('g', {'b': 2})}")
    assert parsed.content == bad and [(call.name, call.arguments) for call in parsed.tool_calls] == [("g", '{"b": 2}')]


def test_a_parser_reads_whole_outputs_again_and_again():
    parser = HermesToolParser()
    first, second = parser.parse(hermes("a", {})), parser.parse("text " + hermes("b", {}))
    assert [call.name for call in first.tool_calls] == ["a"] and first.content == ""
    assert [call.name for call in second.tool_calls] == ["b"] and second.content == "text"


# ---------------------------------------------------------------------- streamed


@pytest.mark.parametrize("case", WELL_FORMED, ids=_case_id)
def test_a_streamed_output_gives_the_same_content_and_calls_split_anywhere(case):
    parser_class, output, content, calls = case
    whole = parser_class().parse(output)
    for pieces in splits(output):
        streamed_content, deltas = stream(parser_class(), pieces)
        assert streamed_content.strip() == whole.content == content, pieces
        found = streamed_calls(deltas)
        assert [(name, json.loads(arguments)) for _, name, arguments in found] == calls, pieces
        assert all(CALL_ID.fullmatch(call_id) for call_id, _, _ in found)
        assert len({call_id for call_id, _, _ in found}) == len(found)


@pytest.mark.parametrize("case", [case for case in WELL_FORMED if "\\u" not in case[1]], ids=_case_id)
def test_streamed_arguments_are_the_models_own_json_text_exactly(case):
    parser_class, output, _, _ = case
    whole = parser_class().parse(output)
    for pieces in (split_every(output, 1), split_randomly(output, 3), [output]):
        _, deltas = stream(parser_class(), pieces)
        assert [arguments for _, _, arguments in streamed_calls(deltas)] == [c.arguments for c in whole.tool_calls]


@pytest.mark.parametrize("case", NOT_CALLS, ids=_case_id)
def test_streamed_text_without_calls_comes_out_unchanged(case):
    parser_class, output = case
    for pieces in splits(output):
        assert stream(parser_class(), pieces) == (output, [])


def test_content_passes_as_soon_as_it_cannot_begin_a_marker():
    parser = HermesToolParser()
    assert parser.feed("Hello ") == ("Hello ", [])
    assert parser.feed("wor<to") == ("wor", [])  # "<to" may begin <tool_call>
    assert parser.feed("y> and ") == ("<toy> and ", [])
    assert parser.feed("<") == ("", [])
    assert parser.flush() == ("<", [])


def test_a_calls_first_delta_goes_out_as_soon_as_its_name_is_read():
    parser = HermesToolParser()
    assert parser.feed("Sure.\n<tool_call>\n") == ("Sure.\n", [])
    assert parser.feed('{"name": "get_wea') == ("", [])
    content, [first] = parser.feed('ther", "arguments": {"ci')
    assert content == "" and first.index == 0 and first.name == "get_weather" and CALL_ID.fullmatch(first.id)
    assert first.arguments == '{"ci'
    assert parser.feed('ty": "Paris"}}\n</tool_call>') == ("", [ParsedToolCallDelta(0, arguments='ty": "Paris"}')])
    assert parser.feed("\n\n") == ("", [])
    assert parser.flush() == ("", [])


def test_whitespace_between_calls_is_dropped_and_words_after_them_pass():
    parser = Llama3JsonToolParser()
    content, deltas = stream(parser, [llama3("a", {}), " ;\n", llama3("b", {}), "\n\n", "Done", ".\n"])
    assert content == "\n\nDone.\n" and [name for _, name, _ in streamed_calls(deltas)] == ["a", "b"]


# ------------------------------------------------------------ streams that end early


def test_a_stream_cut_before_the_name_gives_its_text_back_as_content():
    for parser_class, text in [(HermesToolParser, 'Hi <tool_call>\n{"name": "get_we'),
                               (HermesToolParser, "Hi <tool_call>\n"),
                               (HermesToolParser, "Hi <tool_"),
                               (InternLMToolParser, "Hi <|action_start|><|plu"),
                               (Llama3JsonToolParser, '  {"na'),
                               (JsonArrayToolParser, '[{"name": "a'),
                               (JsonArrayToolParser, "  ")]:
        for pieces in splits(text) if len(text) > 1 else [[text]]:
            assert stream(parser_class(), pieces) == (text, []), (parser_class.name, pieces)


def test_a_stream_cut_inside_the_arguments_keeps_what_was_streamed():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": [1, "x}'
    for pieces in splits(text):
        content, deltas = stream(HermesToolParser(), pieces)
        assert content == "" and [(name, arguments) for _, name, arguments in streamed_calls(deltas)] == [
            ("f", '{"a": [1, "x}')]


def test_a_stream_cut_after_the_name_but_before_arguments_calls_with_none():
    for parser_class, text in [(HermesToolParser, '<tool_call>\n{"name": "f", "argu'),
                               (InternLMToolParser, '<|action_start|><|plugin|>\n{"name": "f"')]:
        for pieces in splits(text):
            content, deltas = stream(parser_class(), pieces)
            assert content == "" and [(n, a) for _, n, a in streamed_calls(deltas)] == [("f", "{}")]


def test_a_stream_cut_after_whole_calls_drops_the_unfinished_frame():
    for parser_class, text, names in [
        (HermesToolParser, hermes("a", {}).removesuffix("_call>"), ["a"]),
        (JsonArrayToolParser, '[{"name": "a", "parameters": {}}, ', ["a"]),
        (JsonArrayToolParser, '[{"name": "a", "parameters": {}}', ["a"]),
        (Llama3JsonToolParser, llama3("a", {}) + "; ", ["a"]),
    ]:
        for pieces in splits(text):
            content, deltas = stream(parser_class(), pieces)
            assert content == "" and [name for _, name, _ in streamed_calls(deltas)] == names, pieces


def test_a_streamed_call_that_turns_malformed_after_its_name_ends_there():
    # Streamed, a call counts from its name on: its pieces are out. What follows the
    # break is content; the parser never raises and never repeats the call's name.
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1} oops}\n</tool_call>'
    for pieces in splits(text):
        content, deltas = stream(HermesToolParser(), pieces)
        assert [(name, arguments) for _, name, arguments in streamed_calls(deltas)] == [("f", '{"a": 1}')]
        assert content.strip() == "oops}\n</tool_call>"


# ---------------------------------------------------------------------- the scanner


@pytest.mark.parametrize("value", ['{"a": "}"}', '["]", {"b": [1]}]', '"a \\" } ]"', '"ends in \\\\"', "-12.5e3"])
def test_the_scanner_finds_where_a_value_ends_fed_one_character_at_a_time(value):
    text = value + (", " if value[0] not in '{["' else " ,")
    scanner, end = JsonValueScanner(), None
    for index in range(len(text)):
        end = scanner.scan(text[:index + 1], index)
        if end is not None:
            break
    assert end == len(value) and json.loads(text[:end]) == json.loads(value)


# ------------------------------------------------------------------------ choosing


def test_a_parser_is_chosen_by_its_name_or_an_alias_in_any_case():
    assert choose_tool_parser(BUILTIN, "hermes", "") is HermesToolParser
    for alias in ("qwen", "Qwen2.5", "QWEN2D5"):
        assert choose_tool_parser(BUILTIN, alias, "<|python_tag|>") is HermesToolParser
    for alias in ("llama3", "Llama3.1", "llama3_1", "llama3_json"):
        assert choose_tool_parser(BUILTIN, alias, "") is Llama3JsonToolParser
    for alias in ("internlm", "internlm2", "Intern-S1", "internlm2_5"):
        assert choose_tool_parser(BUILTIN, alias, "") is InternLMToolParser
    assert choose_tool_parser(BUILTIN, "json", "") is JsonArrayToolParser


def test_an_unknown_name_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match="mistral") as error:
        choose_tool_parser(BUILTIN, "mistral", "<tool_call>")
    for parser in BUILTIN:
        assert parser.name in str(error.value)
    assert "qwen2.5" in str(error.value)
    with pytest.raises(ValueError):
        choose_tool_parser([], "hermes", "")


@pytest.mark.parametrize("source, expected", [
    ("{{ '<tool_call>\\n' + tool_call | tojson + '\\n</tool_call>' }}", HermesToolParser),
    ("{{ '<|python_tag|>' + call }}", Llama3JsonToolParser),
    ('<|start_header_id|>user<|end_header_id|> Respond in the format {"name": ..., "parameters": ...}',
     Llama3JsonToolParser),
    ("<|im_start|>environment name=<|plugin|>", InternLMToolParser),
    ("<|action_start|><|plugin|>\n{...}<|action_end|>", InternLMToolParser),
    ("{% for message in messages %}{{ message.content }}{% endfor %}", HermesToolParser),  # the default
    ("<|start_header_id|>user<|end_header_id|> no tools", HermesToolParser),
])
def test_without_a_name_the_parser_that_fits_the_template_is_chosen(source, expected):
    assert choose_tool_parser(BUILTIN, None, source) is expected


def test_the_json_parser_fits_no_template_and_no_parsers_means_none():
    assert not JsonArrayToolParser.fits("[{\"name\": 1}] <tool_call>")
    assert choose_tool_parser([], None, "<tool_call>") is None
    assert choose_tool_parser([JsonArrayToolParser], None, "") is None


def test_the_first_parser_that_fits_wins():
    class Mine(HermesToolParser):
        name = "mine"

    assert choose_tool_parser([Mine, *BUILTIN], None, "<tool_call>") is Mine
    assert choose_tool_parser([*BUILTIN, Mine], None, "<tool_call>") is HermesToolParser


@pytest.mark.parametrize("template, expected", [
    ("qwen2.5", HermesToolParser), ("internlm2", InternLMToolParser), ("llama3.1", Llama3JsonToolParser),
    ("chatml", HermesToolParser), ("vicuna", HermesToolParser),
])
def test_each_builtin_templates_tool_format_gets_its_parser(template, expected):
    from lmserve.frontends.http.app import tool_format_sample  # what the server shows the parsers

    chosen = next(candidate for candidate in BUILTIN_TEMPLATES if candidate.name == template)
    assert choose_tool_parser(BUILTIN, None, tool_format_sample(chosen)) is expected


# --------------------------------------------------------------------- the plugin


def test_the_hook_contributes_the_four_builtins_through_the_plugin_manager():
    pm = create_plugin_manager(load_entry_points=False)
    parsers = [parser for contributed in pm.hook.lmserve_tool_parsers() for parser in contributed]
    assert parsers == BUILTIN
    assert [parser.name for parser in parsers] == ["hermes", "llama3", "internlm", "json"]
    assert [parser.needs_special_tokens for parser in parsers] == [False, True, True, False]


def test_a_plugins_parser_is_tried_before_the_builtins():
    class Bracketed(HermesToolParser):
        name = "bracketed"
        start_markers, end_marker = ("[CALL]",), "[/CALL]"

        @classmethod
        def fits(cls, template_source):
            return "[CALL]" in template_source

    class Plugin:
        @hookimpl
        def lmserve_tool_parsers(self):
            return [Bracketed]

    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Plugin(), name="bracketed-plugin")
    try:
        parsers = [parser for contributed in pm.hook.lmserve_tool_parsers() for parser in contributed]
    finally:
        pm.unregister(name="bracketed-plugin")
    assert parsers[0] is Bracketed and parsers[1:] == BUILTIN
    assert choose_tool_parser(parsers, None, "[CALL] <tool_call>") is Bracketed
    parsed = Bracketed().parse('Hi [CALL]{"name": "f", "arguments": {"a": [1]}}[/CALL]')
    assert parsed.content == "Hi" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": [1]}')]


@pytest.mark.parametrize("parser_class", BUILTIN, ids=lambda parser: parser.name)
def test_every_builtin_makes_openai_style_call_ids(parser_class):
    output = {HermesToolParser: hermes("f", {}), Llama3JsonToolParser: llama3("f", {}),
              InternLMToolParser: internlm("f", {}), JsonArrayToolParser: json_calls(("f", {}))}[parser_class]
    [call] = parser_class().parse(output).tool_calls
    _, [first] = stream(parser_class(), [output])
    assert CALL_ID.fullmatch(call.id) and CALL_ID.fullmatch(first.id) and call.id != first.id
    assert CALL_ID.fullmatch(new_tool_call_id()) and new_tool_call_id() != new_tool_call_id()
