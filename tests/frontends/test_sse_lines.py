"""Streamed JSON stays one line for every line splitter, whatever text a model emits."""

import json

import pytest
import requests.utils

from lmserve.frontends.interactive.routes import NDJSON
from lmserve.frontends.http.sse import SSE_CONTENT_TYPE, one_line_json, sse_event

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


@pytest.mark.parametrize("content_type", [SSE_CONTENT_TYPE, NDJSON])
def test_requests_decodes_a_stream_as_utf8_so_no_character_splits_a_line(content_type):
    # Latin-1 (requests' guess for text/* without a charset) reads the last byte of "ą" and "х" as U+0085.
    encoding = requests.utils.get_encoding_from_headers({"content-type": content_type})
    wire = sse_event({"choices": [{"delta": {"content": "ąх ok"}}]}).encode()
    assert len(wire.decode("latin-1").strip().splitlines()) == 3  # what a missing charset did
    assert len(wire.decode(encoding).strip().splitlines()) == 1
