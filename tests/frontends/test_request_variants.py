"""Other shapes of a request on a live tiny server: ``max_completion_tokens``,
content parts, raw-string messages, LMDeploy's ``do_preprocess``, unknown keys,
``skip_special_tokens``."""

from tiny_api import MESSAGES, chat, complete, token_count


def test_max_completion_tokens_wins_over_max_tokens(tiny_server):
    reply = chat(tiny_server, max_tokens=10, max_completion_tokens=3, ignore_eos=True)
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    reply = chat(tiny_server, max_completion_tokens=2, ignore_eos=True)
    assert reply["usage"]["completion_tokens"] == 2


def test_content_as_a_list_of_text_parts(tiny_server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    by_parts = chat(tiny_server, parts, max_tokens=6, ignore_eos=True)
    by_string = chat(tiny_server, MESSAGES, max_tokens=6, ignore_eos=True)
    assert by_parts["choices"][0]["message"] == by_string["choices"][0]["message"]
    assert by_parts["usage"] == by_string["usage"]


def test_messages_as_a_raw_string_skip_the_template(tiny_server):
    reply = chat(tiny_server, "hello there", max_tokens=6, ignore_eos=True)
    same = complete(tiny_server, "hello there", max_tokens=6, ignore_eos=True)
    assert reply["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == token_count(tiny_server, prompt="hello there")


def test_do_preprocess_false_sends_the_message_texts_without_template(tiny_server):
    messages = [{"role": "system", "content": "abc "}, {"role": "user", "content": "def"}]
    reply = chat(tiny_server, messages, max_tokens=6, ignore_eos=True, do_preprocess=False)
    same = complete(tiny_server, "abc def", max_tokens=6, ignore_eos=True)
    assert reply["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]
    templated = chat(tiny_server, messages, max_tokens=6, ignore_eos=True)
    assert templated["usage"]["prompt_tokens"] == token_count(tiny_server, messages=messages)
    assert templated["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]


def test_unknown_keys_and_user_are_accepted(tiny_server):
    plain = chat(tiny_server, max_tokens=4)
    extra = chat(tiny_server, max_tokens=4, kwargs={}, user="someone", foo={"bar": [1]}, response_format={"type": "text"})
    assert extra["choices"][0]["message"] == plain["choices"][0]["message"]
    assert complete(tiny_server, max_tokens=2, user="u-1", kwargs={})["choices"][0]["text"]


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(tiny_server):
    body = {"max_tokens": 3, "ignore_eos": True, "logit_bias": {"321": 100}}
    assert complete(tiny_server, **body)["choices"][0]["text"] == ""
    kept = complete(tiny_server, **body, skip_special_tokens=False)["choices"][0]["text"]
    assert kept == "<|im_start|>" * 3
    # A stop string can then match inside a special token's text.
    cut = complete(tiny_server, **body, skip_special_tokens=False, stop="start|>")
    assert cut["choices"][0]["text"] == "<|im_" and cut["choices"][0]["finish_reason"] == "stop"
