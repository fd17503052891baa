"""``n``: several choices per prompt, on a live tiny server: indexed, seeded
reproducibly, streamed the same as not, the prompt counted once."""

import json

import pytest

from conftest import post, stream
from tiny_api import MESSAGES, PROMPT, complete, streamed_finishes, streamed_texts, token_count


def test_n_greedy_choices_are_indexed_and_equal(tiny_server):
    reply = complete(tiny_server, n=3, max_tokens=4, ignore_eos=True)
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2]
    assert len({choice["text"] for choice in reply["choices"]}) == 1
    assert reply["choices"][0]["text"] == complete(tiny_server, max_tokens=4, ignore_eos=True)["choices"][0]["text"]
    usage = reply["usage"]
    assert usage["prompt_tokens"] == token_count(tiny_server, prompt=PROMPT)  # counted once
    assert usage["completion_tokens"] == 12  # summed over the choices
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_n_seeded_sampled_choices_are_reproducible_and_differ(tiny_server, route):
    body = {"model": "tiny", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    body.update({"prompt": PROMPT} if route == "/v1/completions" else {"messages": MESSAGES})
    first, second = post(tiny_server, route, body), post(tiny_server, route, body)
    key = "text" if route == "/v1/completions" else "message"
    assert [c[key] for c in first["choices"]] == [c[key] for c in second["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len({json.dumps(c[key]) for c in first["choices"]}) > 1
    other_seed = post(tiny_server, route, {**body, "seed": 1000})
    assert [c[key] for c in other_seed["choices"]] != [c[key] for c in first["choices"]]


def test_n_streamed_equals_non_streamed(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 11, "n": 3}
    whole = post(tiny_server, "/v1/completions", body)
    payloads = stream(tiny_server, "/v1/completions", body)
    assert streamed_texts(payloads, chat=False) == {c["index"]: c["text"] for c in whole["choices"]}
    assert streamed_finishes(payloads) == {c["index"]: [c["finish_reason"]] for c in whole["choices"]}
