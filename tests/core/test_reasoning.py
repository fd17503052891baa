"""A reasoning parser splits an output into its reasoning and its content, exactly,
however the output was cut into streamed pieces.

Every case below is read whole with ``parse`` and then streamed: cut into 2 and into
3 pieces at every pair of character positions (so every tag is cut at every
character), fed piece by piece and flushed. The pieces joined must equal the whole
split, and the whole split must equal what the case says. Where the output starts
is decided by the prompt's end: one that opens ``<think>`` starts inside the
reasoning; otherwise only an output that begins with ``<think>`` has any.
"""

import itertools

import pytest

from lmserve.core.reasoning import (
    ReasoningParser,
    ReasoningReader,
    choose_reasoning_parser,
    reasoning_choice_line,
)


class ThinkParser(ReasoningParser):
    name = "think-test"
    aliases = ("thinking",)


OPENED = "<|im_start|>assistant\n<think>\n"  # QwQ / DeepSeek-R1 distills: the template opens it
PLAIN = "<|im_start|>assistant\n"  # Qwen3 thinking: the model writes <think> itself
CLOSED = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3 with enable_thinking false

# (prompt end, output, expected reasoning, expected content)
CASES = [
    (PLAIN, "<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", "\nLet me see: 2+2.\n", "\n\nIt is 4."),
    (PLAIN, "\n <think>a</think>b", "a", "b"),  # whitespace before the open tag belongs to neither
    (PLAIN, "Just an answer.", "", "Just an answer."),
    (PLAIN, "  An answer that mentions <think> and </think>.", "",
     "  An answer that mentions <think> and </think>."),
    (PLAIN, "<thinking>is not the tag</thinking>", "", "<thinking>is not the tag</thinking>"),
    (PLAIN, "<think>never closed, cut by max_tokens", "never closed, cut by max_tokens", ""),
    (PLAIN, "<think></think>", "", ""),
    (PLAIN, "<think>a</thi</think>b</think>", "a</thi", "b</think>"),  # the first close tag ends it
    (PLAIN, "<think>x <tool_call> y</think><tool_call>\n{}\n</tool_call>", "x <tool_call> y",
     "<tool_call>\n{}\n</tool_call>"),
    (PLAIN, "<thi", "", "<thi"),  # a tag cut short by the end is text
    (PLAIN, "", "", ""),
    (OPENED, "Okay, so 2+2.\n</think>\n\nIt is 4.", "Okay, so 2+2.\n", "\n\nIt is 4."),
    (OPENED, "all reasoning, never closed", "all reasoning, never closed", ""),
    (OPENED, "\n<think>again</think>done", "again", "done"),  # an open tag written again is dropped
    (OPENED, "  \n", "  \n", ""),
    (OPENED, "</th", "</th", ""),
    (OPENED, "héllo ✓ 你好</think>答案", "héllo ✓ 你好", "答案"),
    (CLOSED, "It is 4.", "", "It is 4."),
    (CLOSED, "<think>still may</think>x", "still may", "x"),
    ("", "<think>a</think>b", "a", "b"),
]


def streamed(parser: ReasoningParser, pieces) -> tuple[str, str]:
    reasoning, content = [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    return "".join(reasoning) + r, "".join(content) + c


def every_cut(text: str):
    """``text`` whole, and cut into 2 and into 3 pieces at every position (empty pieces too)."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        yield [text[:i], text[i:j], text[j:]]


@pytest.mark.parametrize("prompt_end, output, reasoning, content", CASES)
def test_an_output_split_whole_gives_the_reasoning_and_the_content(prompt_end, output, reasoning, content):
    assert ThinkParser(prompt_end).parse(output) == (reasoning, content)


@pytest.mark.parametrize("prompt_end, output, reasoning, content", CASES)
def test_an_output_streamed_in_any_pieces_splits_exactly_as_the_whole(prompt_end, output, reasoning, content):
    for pieces in every_cut(output):
        assert streamed(ThinkParser(prompt_end), pieces) == (reasoning, content), pieces


def test_text_that_may_still_begin_a_tag_is_held_back_and_nothing_else():
    parser = ThinkParser(PLAIN)
    assert parser.feed("\n") == ("", "")  # whitespace: an open tag may follow
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>abc</") == ("abc", "")  # "</" may begin the close tag
    assert not parser.reasoning_over
    assert parser.feed("b>d</thin") == ("</b>d", "")
    assert parser.feed("k>") == ("", "")
    assert parser.reasoning_over
    assert parser.feed(" answer <") == ("", " answer <")  # the content holds nothing back
    assert parser.flush() == ("", "")


def test_an_output_that_begins_as_content_is_over_with_reasoning_at_once():
    parser = ThinkParser(PLAIN)
    assert parser.feed("Hi") == ("", "Hi")
    assert parser.reasoning_over
    assert parser.feed("<think>x</think>") == ("", "<think>x</think>")


@pytest.mark.parametrize("prompt_end, opens", [
    (OPENED, True), ("<think>", True), ("x<think>  \n\n", True), (PLAIN, False), (CLOSED, False),
    ("", False), ("<think>\nsome text", False), ("</think>", False),
])
def test_only_a_prompt_that_ends_with_the_open_tag_opens_the_reasoning(prompt_end, opens):
    assert ThinkParser.prompt_opens_reasoning(prompt_end) is opens
    assert ThinkParser(prompt_end).starts_in_reasoning is opens


def test_a_parser_names_its_own_tags():
    class Seed(ReasoningParser):
        name = "seed"
        open_tag, close_tag = "<seed:think>", "</seed:think>"

    assert Seed("x<seed:think>").parse("a</think>b</seed:think>c") == ("a</think>b", "c")
    assert Seed("").parse("<think>a</think>b") == ("", "<think>a</think>b")
    assert Seed.fits("{{ '<seed:think>' }} ... </seed:think>") and not Seed.fits("<think></think>")


# ------------------------------------------------------------------- the token count


def reader_over(prompt_end: str, pieces: list[tuple[str, int]]) -> tuple[ReasoningReader, str, str]:
    reader = ReasoningReader(ThinkParser(prompt_end))
    reasoning, content = "", ""
    for text, tokens in pieces:
        r, c = reader.feed(text, tokens)
        reasoning, content = reasoning + r, content + c
    r, c = reader.flush()
    return reader, reasoning + r, content + c


def test_reasoning_tokens_run_up_to_and_including_the_close_tag():
    reader, reasoning, content = reader_over(PLAIN, [("<think>", 1), ("a", 1), ("b", 2), ("</think>", 1),
                                                     ("\n\n", 1), ("Hi", 1), ("", 1)])
    assert (reasoning, content) == ("ab", "\n\nHi")
    assert reader.reasoning_tokens == 5


def test_an_output_whose_reasoning_never_closes_counts_every_token_its_stop_token_too():
    reader, reasoning, content = reader_over(OPENED, [("a", 1), ("b", 1), ("", 1)])
    assert (reasoning, content, reader.reasoning_tokens) == ("ab", "", 3)


def test_an_output_without_reasoning_counts_none_even_when_it_began_undecided():
    reader, reasoning, content = reader_over(PLAIN, [("\n", 1), ("<th", 1), ("ought", 1), (" more", 1)])
    assert (reasoning, content, reader.reasoning_tokens) == ("", "\n<thought more", 0)


# ----------------------------------------------------------------------- the choice


OTHER = type("OtherParser", (ReasoningParser,), {"name": "other", "open_tag": "<r>", "close_tag": "</r>"})


@pytest.mark.parametrize("name", ["think-test", "THINK-TEST", "thinking"])
def test_a_parser_is_chosen_by_its_name_or_an_alias_in_any_case(name):
    assert choose_reasoning_parser([OTHER, ThinkParser], name, "") is ThinkParser


def test_none_turns_the_split_off_whatever_the_template_writes():
    assert choose_reasoning_parser([ThinkParser], "none", "<think></think>") is None
    assert choose_reasoning_parser([ThinkParser], "None", "<think></think>") is None


def test_without_a_name_the_first_parser_whose_tags_the_template_writes_is_chosen():
    template = "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    assert choose_reasoning_parser([OTHER, ThinkParser], None, template) is ThinkParser
    assert choose_reasoning_parser([OTHER, ThinkParser], None, "<r></r><think></think>") is OTHER
    assert choose_reasoning_parser([ThinkParser], None, "{{ content.split('</think>')[-1] }}") is None
    assert choose_reasoning_parser([ThinkParser], None, "") is None


def test_an_unknown_name_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        choose_reasoning_parser([ThinkParser, OTHER], "nonsense", "")
    assert str(excinfo.value) == "Unknown reasoning parser 'nonsense'; known: think-test (thinking), other, none."


def test_the_startup_line_says_which_parser_and_why():
    assert reasoning_choice_line(ThinkParser, None) == (
        "reasoning parser 'think-test' (the chat template writes <think> and </think>): "
        "<think>...</think> goes to reasoning_content")
    assert "(--reasoning-parser thinking)" in reasoning_choice_line(ThinkParser, "thinking")
    assert reasoning_choice_line(None, None).startswith("reasoning parser: none (the chat template writes no")
    assert reasoning_choice_line(None, "none").startswith("reasoning parser: none (--reasoning-parser none)")
