"""``min_tokens`` (LMDeploy: ``min_new_tokens``) on a live tiny server: no EOS, stop
token or stop string ends a generation before it."""

import pytest

from conftest import stream
from tiny_api import EOS, PROMPT, chat, complete, pick_stop, pick_stop_token, streamed_texts, token_id
from tiny_api import greedy  # noqa: F401  (a fixture: tests name it as an argument)


def first_greedy_token_id(server, prompt=PROMPT) -> int:
    """The id of the first token greedy decoding picks after ``prompt`` (no template)."""
    reply = chat(server, prompt, max_tokens=1, ignore_eos=True, logprobs=True)
    data = bytes(reply["choices"][0]["logprobs"]["content"][0]["bytes"])
    if len(data) == 1:  # a byte token: byte-level ids are the byte values
        return data[0]
    found = token_id(server, data.decode())
    assert found is not None
    return found


@pytest.mark.parametrize("name", ["min_tokens", "min_new_tokens"])
def test_min_tokens_holds_back_a_stop_token_greedy_would_pick_first(tiny_server, name):
    stop_id = first_greedy_token_id(tiny_server)
    body = {"max_tokens": 8, "stop_token_ids": [stop_id]}
    reply = complete(tiny_server, **body)
    assert reply["usage"]["completion_tokens"] == 1 and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["text"] == ""
    reply = complete(tiny_server, **body, **{name: 4})
    assert reply["usage"]["completion_tokens"] >= 4
    # Forced by logit_bias, the stop token comes as soon as it is allowed: the fifth token.
    forced = complete(tiny_server, **body, logit_bias={str(stop_id): 100}, **{name: 4})
    assert forced["usage"]["completion_tokens"] == 5 and forced["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("name", ["min_tokens", "min_new_tokens"])
def test_min_tokens_above_max_tokens_is_cut_to_it(tiny_server, name):
    """As max_tokens past the context's room is cut to the room (LMDeploy's rule), min_tokens past
    max_tokens is cut to max_tokens: EOS is held back for the whole reply."""
    reply = complete(tiny_server, max_tokens=5, logit_bias={str(EOS): 100}, **{name: 10})
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("name", ["min_tokens", "min_new_tokens"])
def test_min_tokens_holds_back_eos(tiny_server, name):
    body = {"max_tokens": 8, "logit_bias": {str(EOS): 100}, name: 3}
    reply = complete(tiny_server, **body)
    assert reply["usage"]["completion_tokens"] == 4 and reply["choices"][0]["finish_reason"] == "stop"
    # EOS masked, the other logits are untouched: the first three tokens are plain greedy's.
    unbiased = complete(tiny_server, max_tokens=3, ignore_eos=True)["choices"][0]["text"]
    assert reply["choices"][0]["text"] == unbiased
    payloads = stream(tiny_server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "temperature": 0, **body})
    assert streamed_texts(payloads, chat=False) == {0: unbiased}


def test_min_tokens_with_a_greedy_stop_token_keeps_at_least_min_tokens(tiny_server, greedy):
    _, tokens, _ = greedy
    position, stop_id = pick_stop_token(tiny_server, tokens)
    reply = complete(tiny_server, max_tokens=position + 6, ignore_eos=True, stop_token_ids=[stop_id],
                     min_tokens=position + 3)
    assert reply["usage"]["completion_tokens"] >= position + 3


def test_min_tokens_delays_stop_strings(tiny_server, greedy):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts, length=2)
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=stop, min_tokens=40)
    assert reply["choices"][0]["text"] == text  # no stop before min_tokens (here: the whole output)
