"""Structured outputs on the live tiny server: response_format json_object,
json_schema and regex_schema, streamed and not, with n, seeds, stop strings, in
batch with free requests, and in interactive sessions; bad formats are 400s.

The tiny model is random, so only the grammar can make its output valid: every
check here fails without the constraint. Schemas are finite (enums, bounded
integers) so a random model ends them within max_tokens.
"""

import asyncio
import json
import re

import httpx
import pytest

from conftest import post, stream
from tiny_api import MESSAGES

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "integer", "minimum": 1, "maximum": 9},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["color", "size", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
REGEX = r"[0-9]{3}-[a-c]{2}"
CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "temperature": 1.0}


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == {"color", "size", "tags"}
            and value["color"] in ("red", "green", "blue") and 1 <= value["size"] <= 9
            and isinstance(value["tags"], list) and len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"})


def chat(server, **body) -> dict:
    return post(server, "/v1/chat/completions", {**CHAT, **body})


def test_a_json_schema_constrains_every_choice(tiny_server):
    reply = chat(tiny_server, response_format=JSON_SCHEMA, n=4, seed=3)
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        assert valid(choice["message"]["content"]), choice["message"]["content"]


def test_without_the_format_the_random_model_writes_no_such_json(tiny_server):
    reply = chat(tiny_server, n=4, seed=3)  # the control: the checks above can fail
    assert not any(valid(choice["message"]["content"]) for choice in reply["choices"])


def test_a_streamed_constrained_reply_is_the_same_json(tiny_server):
    body = {**CHAT, "response_format": JSON_SCHEMA, "seed": 11}
    chunks = stream(tiny_server, "/v1/chat/completions", body)
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks if chunk["choices"])
    assert valid(text)
    assert text == post(tiny_server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]


def test_json_object_gives_a_json_object(tiny_server):
    for seed in range(3):
        reply = chat(tiny_server, response_format={"type": "json_object"}, seed=seed, max_tokens=200)
        choice = reply["choices"][0]
        if choice["finish_reason"] == "stop":  # an open-ended object may run past max_tokens
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")


def test_a_regex_schema_constrains_chat_and_completions(tiny_server):
    format_ = {"type": "regex_schema", "regex_schema": REGEX}
    chat_text = chat(tiny_server, response_format=format_, seed=5)["choices"][0]["message"]["content"]
    completion = post(tiny_server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 20,
                                                       "response_format": format_})
    for text in (chat_text, completion["choices"][0]["text"]):
        assert re.fullmatch(REGEX, text), text


def test_seeded_constrained_requests_repeat_and_stop_strings_still_cut(tiny_server):
    first = chat(tiny_server, response_format=JSON_SCHEMA, seed=21)["choices"][0]["message"]["content"]
    assert chat(tiny_server, response_format=JSON_SCHEMA, seed=21)["choices"][0]["message"]["content"] == first
    cut = chat(tiny_server, response_format=JSON_SCHEMA, seed=21, stop=['"size"'])["choices"][0]
    assert cut["finish_reason"] == "stop" and first.startswith(cut["message"]["content"])
    assert '"size"' not in cut["message"]["content"]


def test_constrained_and_free_requests_share_batches(tiny_server):
    async def run():
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as client:
            bodies = [{**CHAT, "seed": i, **({"response_format": JSON_SCHEMA} if i % 2 else {})} for i in range(12)]
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
            return bodies, [response.json() for response in responses]

    bodies, replies = asyncio.run(run())
    for body, reply in zip(bodies, replies):
        text = reply["choices"][0]["message"]["content"]
        if "response_format" in body:
            assert valid(text), text
        # the free ones are what they are alone (the constrained rows did not disturb them)
        else:
            assert text == chat(tiny_server, seed=body["seed"])["choices"][0]["message"]["content"]


def test_an_interactive_session_turn_takes_a_response_format(tiny_server):
    body = {"prompt": "hi", "session_id": 4242, "interactive_mode": True, "request_output_len": 60,
            "temperature": 1.0, "seed": 2, "response_format": JSON_SCHEMA}
    first = post(tiny_server, "/v1/chat/interactive", body)
    second = post(tiny_server, "/v1/chat/interactive", {**body, "prompt": "again", "interactive_mode": False})
    assert valid(first["text"]) and valid(second["text"])
    assert second["history_tokens"] > 0


@pytest.mark.parametrize("format_, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "schema"),
    ({"type": "regex_schema", "regex_schema": "[a-"}, "regular expression"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "regex_schema"}, "regex_schema"),
    ({"type": "yaml"}, "type"),
])
def test_a_bad_format_is_a_400_naming_response_format(tiny_server, format_, words):
    response = httpx.post(tiny_server.base_url + "/v1/chat/completions",
                          json={**CHAT, "response_format": format_}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["param"].startswith("response_format") and words in error["message"], error
