"""Streamed JSON stays one line for every line splitter, whatever text a model emits."""

import json

import pytest

from lmserve.frontends.openai.sse import one_line_json, sse_event

# Python's str.splitlines (requests' iter_lines with decode_unicode) breaks at these too.
TEXT = "a\x85b\u2028c\u2029d\x1ce\x0bf\x0cg\rh\ni"


def test_an_event_is_one_line_however_a_client_splits_it():
    event = sse_event({"choices": [{"delta": {"content": TEXT}}]})
    assert event.endswith("\n\n") and event.count("\n") == 2
    (line,) = event.strip().splitlines()  # str.splitlines: the widest notion of a line break
    assert json.loads(line.removeprefix("data: "))["choices"][0]["delta"]["content"] == TEXT


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_json_lines_keep_their_text_and_their_separators(separators):
    line = one_line_json({"text": TEXT, "tokens": 3}, separators)
    assert len(line.splitlines()) == 1
    assert json.loads(line) == {"text": TEXT, "tokens": 3}
    assert (", " in line) == (separators[0] == ", ")
