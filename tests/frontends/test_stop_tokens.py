"""Stop tokens on a live tiny server: ``stop_token_ids``, EOS, and ``ignore_eos``."""

from conftest import post, stream
from tiny_api import EOS, PROMPT, complete, pick_stop_token, streamed_finishes, streamed_texts
from tiny_api import greedy  # noqa: F401  (a fixture: tests name it as an argument)


def test_stop_token_ids_end_the_generation_without_text(tiny_server, greedy):
    _, tokens, _ = greedy
    position, stop_id = pick_stop_token(tiny_server, tokens)
    prefix = complete(tiny_server, max_tokens=position, ignore_eos=True)["choices"][0]["text"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop_token_ids": [stop_id]}
    reply = post(tiny_server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == prefix
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == position + 1  # the stop token is counted
    payloads = stream(tiny_server, "/v1/completions", body)
    assert streamed_texts(payloads, chat=False) == {0: prefix}
    assert streamed_finishes(payloads) == {0: ["stop"]}


def test_eos_forced_by_logit_bias_ends_at_once(tiny_server):
    reply = complete(tiny_server, max_tokens=6, logit_bias={str(EOS): 100})
    assert reply["choices"][0]["text"] == "" and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 1


def test_ignore_eos_runs_to_max_tokens(tiny_server):
    reply = complete(tiny_server, max_tokens=5, ignore_eos=True, logit_bias={str(EOS): 100})
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["text"] == ""  # EOS is special: skipped in the text
