"""The OpenAI API's features on a live tiny server: n, stop, stop_token_ids,
min_tokens, logprobs, echo, prompt lists, the LMDeploy extensions and the
tokenizer routes.

Where texts are compared the decoding is greedy (``temperature=0``), so the
same prompt gives the same tokens however the request is shaped.
"""

import codecs
import json
import math

import httpx
import pytest

from conftest import post, stream

MESSAGES = [{"role": "user", "content": "hello there"}]
PROMPT = "The quick brown fox"
EOS = 322  # <|im_end|> of the tiny tokenizer (tests/tiny_tokenizer.py)
BOS = 320  # <|endoftext|>


# --------------------------------------------------------------------------- helpers


def complete(server, prompt=PROMPT, **body) -> dict:
    return post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0, **body})


def chat(server, messages=MESSAGES, **body) -> dict:
    return post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0, **body})


def streamed_texts(payloads: list[dict], chat: bool) -> dict[int, str]:
    """Each choice's text, concatenated from its deltas."""
    texts: dict[int, str] = {}
    for payload in payloads:
        for choice in payload["choices"]:
            piece = (choice["delta"].get("content") or "") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def streamed_finishes(payloads: list[dict]) -> dict[int, list[str]]:
    finishes: dict[int, list[str]] = {}
    for payload in payloads:
        for choice in payload["choices"]:
            if choice["finish_reason"] is not None:
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    return finishes


def token_count(server, **body) -> int:
    return post(server, "/tokenize", body)["count"]


def token_id(server, text: str) -> int | None:
    """The id of ``text`` when it is one token of the tiny vocabulary."""
    reply = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    return reply["tokens"][0] if reply["count"] == 1 else None


def greedy_tokens(server, prompt=PROMPT, max_tokens=40) -> tuple[str, list[str], list[int]]:
    """The greedy text of ``prompt``, its tokens' names and where each starts in
    the text (EOS cannot end it)."""
    reply = complete(server, prompt, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    logprobs = reply["choices"][0]["logprobs"]
    return reply["choices"][0]["text"], logprobs["tokens"], logprobs["text_offset"]


def chat_token_starts(content: list[dict]) -> list[int]:
    """Where each token of chat ``logprobs.content`` starts in the text, from its bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, offset = [], 0
    for entry in content:
        starts.append(offset)
        offset += len(decoder.decode(bytes(entry["bytes"])))
    return starts


def pick_stop(text: str, starts: list[int], length: int = 4) -> str:
    """A stop string from the middle of ``text`` that spans a token boundary and
    does not occur earlier; no replacement characters (bytes of a split character)."""
    for offset in starts[1:]:
        start = offset - length // 2
        stop = text[start:start + length]
        if start > 4 and len(stop) == length and "\ufffd" not in stop and text.find(stop) == start:
            return stop
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.fixture(scope="module")
def greedy(tiny_server):
    return greedy_tokens(tiny_server)


# -------------------------------------------------------------------------------- n


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


# ----------------------------------------------------------------------------- stop


def test_the_greedy_text_is_usable(greedy):
    text, tokens, starts = greedy
    assert len(tokens) == 40 and len(text) > 20


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_cuts_the_text_exactly(tiny_server, greedy, include):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=stop, include_stop_str_in_output=include)
    choice = reply["choices"][0]
    end = text.find(stop) + (len(stop) if include else 0)
    assert choice["text"] == text[:end]
    assert choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 40  # the generation ended there


@pytest.mark.parametrize("include", [False, True])
def test_a_list_of_stop_strings_cuts_at_the_earliest(tiny_server, greedy, include):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    later = text[text.find(stop) + len(stop):][:3]
    assert later and later not in text[: text.find(stop) + len(stop)]
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=[later, "never-there", stop],
                     include_stop_str_in_output=include)
    end = text.find(stop) + (len(stop) if include else 0)
    assert reply["choices"][0]["text"] == text[:end]


@pytest.mark.parametrize("include", [False, True])
def test_streamed_stop_equals_non_streamed(tiny_server, greedy, include):
    text, tokens, starts = greedy
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop": [pick_stop(text, starts)], "include_stop_str_in_output": include}
    whole = post(tiny_server, "/v1/completions", body)
    payloads = stream(tiny_server, "/v1/completions", body)
    assert streamed_texts(payloads, chat=False) == {0: whole["choices"][0]["text"]}
    assert streamed_finishes(payloads) == {0: ["stop"]}


def test_chat_stop_streamed_and_not(tiny_server):
    reply = chat(tiny_server, max_tokens=40, ignore_eos=True, logprobs=True)
    text = reply["choices"][0]["message"]["content"]
    stop = pick_stop(text, chat_token_starts(reply["choices"][0]["logprobs"]["content"]), length=3)
    stopped = chat(tiny_server, max_tokens=40, ignore_eos=True, stop=stop)
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    payloads = stream(tiny_server, "/v1/chat/completions",
                      {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 40,
                       "ignore_eos": True, "stop": stop})
    assert streamed_texts(payloads, chat=True) == {0: text[: text.find(stop)]}
    assert streamed_finishes(payloads) == {0: ["stop"]}


def test_n_choices_with_a_stop_string(tiny_server, greedy):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "n": 2, "stop": stop}
    whole = post(tiny_server, "/v1/completions", body)
    assert [c["text"] for c in whole["choices"]] == [text[: text.find(stop)]] * 2
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {
        0: text[: text.find(stop)], 1: text[: text.find(stop)]}


def test_a_stop_string_held_back_at_the_end_is_released(tiny_server, greedy):
    """The text's tail may begin a stop string; when the length limit comes first, it is still sent."""
    text, _, _ = greedy
    stop = text[-2:] + "\x00\x00\x00"
    assert stop not in text
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": stop}
    reply = post(tiny_server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == text and reply["choices"][0]["finish_reason"] == "length"
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {0: text}


def test_a_stop_string_absent_from_the_text_changes_nothing(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, stop=["\x00\x01never\x02"])
    assert reply["choices"][0]["text"] == text


# ------------------------------------------------------------------- stop_token_ids


def pick_stop_token(server, tokens: list[str]) -> tuple[int, int]:
    """(position, id) of a greedy token, not the first, whose id is known and
    that does not occur earlier."""
    for position, token in enumerate(tokens):
        if position < 2 or token in tokens[:position] or token.startswith("bytes:"):
            continue
        found = token_id(server, token)
        if found is not None:
            return position, found
    pytest.fail(f"no usable stop token in {tokens!r}")


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


# ----------------------------------------------------------------------- min_tokens


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


# ------------------------------------------------------------------------- logprobs


def test_chat_logprobs_with_top_alternatives(tiny_server):
    reply = chat(tiny_server, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 8
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [alt["logprob"] for alt in top] == sorted((alt["logprob"] for alt in top), reverse=True)
        assert top[0]["bytes"] == entry["bytes"] and top[0]["token"] == entry["token"]  # greedy: the top-1
        assert top[0]["logprob"] == entry["logprob"]
        assert all(alt["logprob"] <= 0 for alt in top) and entry["logprob"] <= 0
        assert sum(math.exp(alt["logprob"]) for alt in top) <= 1 + 1e-6
        try:  # a token that is part of a character is named by its bytes, as OpenAI does
            assert entry["token"] == bytes(entry["bytes"]).decode("utf-8")
        except UnicodeDecodeError:
            assert entry["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in entry["bytes"])
    all_bytes = bytes(b for entry in content for b in entry["bytes"])
    assert all_bytes.decode("utf-8", errors="replace") == choice["message"]["content"]


def test_chat_logprobs_without_top_logprobs(tiny_server):
    content = chat(tiny_server, max_tokens=4, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)
    content = chat(tiny_server, max_tokens=4, logprobs=True, top_logprobs=0)["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)
    assert chat(tiny_server, max_tokens=4)["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed_equal_non_streamed(tiny_server):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    whole = post(tiny_server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    streamed = [entry for payload in stream(tiny_server, "/v1/chat/completions", body)
                for choice in payload["choices"] if choice["logprobs"]
                for entry in choice["logprobs"]["content"]]
    assert streamed == whole


def test_completion_logprobs_columns(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)
    choice = reply["choices"][0]
    assert choice["text"] == text
    logprobs = choice["logprobs"]
    columns = [logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")]
    assert {len(column) for column in columns} == {40}
    assert all(value <= 0 for value in logprobs["token_logprobs"])
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, offset, top in zip(logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 2 and all(value <= 0 for value in top.values())
        if not token.startswith("bytes:"):  # a whole token: its text is at its offset
            assert text[offset:offset + len(token)] == token


def test_completion_logprobs_greedy_token_is_the_top_alternative(tiny_server):
    """In ASCII stretches (distinct token texts) the greedy token is the best alternative."""
    logprobs = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)["choices"][0]["logprobs"]
    checked = 0
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        if token.startswith("bytes:") or len(top) < 2:
            continue
        assert top[token] == logprob == max(top.values())
        checked += 1
    assert checked >= 5


def test_completion_top_logprobs_keep_the_sampled_tokens_logprob(tiny_server):
    logprobs = complete(tiny_server, max_tokens=40, ignore_eos=True, logprobs=2)["choices"][0]["logprobs"]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 2
        assert top.get(token) == logprob  # greedy: the sampled token is the top-1


def test_completion_text_offsets_stay_inside_the_text(tiny_server):
    # "hello world" makes the tiny model write a two-byte character out of two byte tokens.
    reply = complete(tiny_server, "hello world", max_tokens=40, ignore_eos=True, logprobs=0)
    text, logprobs = reply["choices"][0]["text"], reply["choices"][0]["logprobs"]
    assert any(t.startswith("bytes:") for t in logprobs["tokens"])  # the premise: parts of characters
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and all(offset < len(text) for offset in offsets)
    for token, offset in zip(logprobs["tokens"], offsets):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token


def test_completion_logprobs_streamed_equal_non_streamed(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "ignore_eos": True, "logprobs": 1}
    whole = post(tiny_server, "/v1/completions", body)["choices"][0]["logprobs"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for payload in stream(tiny_server, "/v1/completions", body):
        for key in merged:
            merged[key] += payload["choices"][0]["logprobs"][key]
    assert merged == whole


# ----------------------------------------------------------------------------- echo


def test_echo_prepends_the_prompt(tiny_server, greedy):
    text, _, _ = greedy
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True)
    assert reply["choices"][0]["text"] == PROMPT + text
    assert reply["usage"]["completion_tokens"] == 40


def test_echo_streamed_and_with_n_and_token_ids(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": "abc"})["tokens"]
    plain = complete(tiny_server, "abc", max_tokens=5, ignore_eos=True)["choices"][0]["text"]
    body = {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 5, "ignore_eos": True,
            "echo": True, "n": 2}
    whole = post(tiny_server, "/v1/completions", body)
    assert [c["text"] for c in whole["choices"]] == ["abc" + plain] * 2
    assert streamed_texts(stream(tiny_server, "/v1/completions", body), chat=False) == {0: "abc" + plain,
                                                                                       1: "abc" + plain}


def test_echo_with_a_stop_string_keeps_the_prompt(tiny_server, greedy):
    text, tokens, starts = greedy
    stop = pick_stop(text, starts)
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True, stop=stop)
    assert reply["choices"][0]["text"] == PROMPT + text[: text.find(stop)]


def test_a_stop_string_in_the_echoed_prompt_does_not_cut(tiny_server, greedy):
    text, _, _ = greedy
    assert "quick" not in text
    reply = complete(tiny_server, max_tokens=40, ignore_eos=True, echo=True, stop="quick")
    assert reply["choices"][0]["text"] == PROMPT + text
    assert reply["choices"][0]["finish_reason"] == "length"


def test_echo_with_logprobs_scores_the_prompt_too(tiny_server):
    """lm-eval's loglikelihood: echo + logprobs gives every prompt token's logprob (the first: None)."""
    prompt_ids = post(tiny_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 3, "ignore_eos": True,
            "logprobs": 1, "echo": True}
    whole = post(tiny_server, "/v1/completions", body)
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 3 == whole["usage"]["prompt_tokens"] + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(value <= 0 for value in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    assert choice["text"].startswith(PROMPT)
    # the completion's part equals what the same request without echo returns
    plain = post(tiny_server, "/v1/completions", {**body, "echo": False})["choices"][0]["logprobs"]
    assert logprobs["tokens"][len(prompt_ids):] == plain["tokens"]
    assert logprobs["token_logprobs"][len(prompt_ids):] == plain["token_logprobs"]
    # streamed: the echo chunk carries the prompt's columns; everything concatenates to the same
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for payload in stream(tiny_server, "/v1/completions", body):
        for streamed in payload["choices"]:
            text += streamed["text"]
            for key in merged:
                merged[key] += (streamed["logprobs"] or {}).get(key, [])
    assert text == choice["text"] and merged == logprobs


def test_logprobs_of_a_stopped_generation_cover_every_counted_token(tiny_server, greedy):
    text, tokens, starts = greedy
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 40, "ignore_eos": True,
            "logprobs": 0, "stop": pick_stop(text, starts)}
    whole = post(tiny_server, "/v1/completions", body)
    counted = whole["usage"]["completion_tokens"]
    assert whole["choices"][0]["logprobs"]["tokens"] == tokens[:counted]
    streamed = [token for payload in stream(tiny_server, "/v1/completions", body)
                for token in payload["choices"][0]["logprobs"]["tokens"]]
    assert streamed == tokens[:counted]


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(tiny_server):
    body = {"max_tokens": 3, "ignore_eos": True, "logit_bias": {"321": 100}}
    assert complete(tiny_server, **body)["choices"][0]["text"] == ""
    kept = complete(tiny_server, **body, skip_special_tokens=False)["choices"][0]["text"]
    assert kept == "<|im_start|>" * 3
    # A stop string can then match inside a special token's text.
    cut = complete(tiny_server, **body, skip_special_tokens=False, stop="start|>")
    assert cut["choices"][0]["text"] == "<|im_" and cut["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------- prompt lists


def test_prompt_as_a_list_of_strings(tiny_server):
    prompts = ["abc", PROMPT, "def f(x):"]
    alone = [complete(tiny_server, p, max_tokens=4, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    reply = complete(tiny_server, prompts, max_tokens=4, ignore_eos=True, n=2)
    assert [c["index"] for c in reply["choices"]] == list(range(6))
    assert [c["text"] for c in reply["choices"]] == [text for text in alone for _ in range(2)]
    assert reply["usage"]["prompt_tokens"] == sum(token_count(tiny_server, prompt=p) for p in prompts)
    assert reply["usage"]["completion_tokens"] == 6 * 4


def test_prompt_as_token_ids_equals_the_string(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    by_ids = complete(tiny_server, ids, max_tokens=6, ignore_eos=True)
    by_text = complete(tiny_server, PROMPT, max_tokens=6, ignore_eos=True)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_prompt_as_a_list_of_token_id_lists(tiny_server):
    prompts = ["abc", PROMPT]
    ids = [post(tiny_server, "/tokenize", {"prompt": p})["tokens"] for p in prompts]
    alone = [complete(tiny_server, p, max_tokens=3, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    reply = complete(tiny_server, ids, max_tokens=3, ignore_eos=True, n=2)
    assert [(c["index"], c["text"]) for c in reply["choices"]] == [
        (0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    assert reply["usage"]["prompt_tokens"] == sum(map(len, ids))
    payloads = stream(tiny_server, "/v1/completions", {"model": "tiny", "prompt": ids, "temperature": 0,
                                                       "max_tokens": 3, "ignore_eos": True, "n": 2})
    assert streamed_texts(payloads, chat=False) == {c["index"]: c["text"] for c in reply["choices"]}


def test_a_prompt_list_with_one_prompt_too_long_is_refused_whole(tiny_server):
    body = {"model": "tiny", "prompt": [[97, 98, 99], list(range(300))]}
    error = post(tiny_server, "/v1/completions", body, status=400)
    assert error["param"] == "prompt" and "context length" in error["message"]


# --------------------------------------------------------------- request variants


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


def test_ignore_eos_runs_to_max_tokens(tiny_server):
    reply = complete(tiny_server, max_tokens=5, ignore_eos=True, logit_bias={str(EOS): 100})
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["text"] == ""  # EOS is special: skipped in the text


# ----------------------------------------------------------------- tokenizer routes


def test_encode_a_string_and_a_list(tiny_server):
    ids = post(tiny_server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})["tokens"]
    reply = post(tiny_server, "/v1/encode", {"input": "hello world"})
    assert reply == {"input_ids": [BOS, *ids], "length": len(ids) + 1}
    reply = post(tiny_server, "/v1/encode", {"input": "hello world", "add_bos": False})
    assert reply == {"input_ids": ids, "length": len(ids)}
    reply = post(tiny_server, "/v1/encode", {"input": ["hello world", "ab"], "add_bos": False})
    ab = post(tiny_server, "/tokenize", {"prompt": "ab", "add_special_tokens": False})["tokens"]
    assert reply == {"input_ids": [ids, ab], "length": [len(ids), len(ab)]}


def test_encode_do_preprocess_renders_a_user_turn(tiny_server):
    reply = post(tiny_server, "/v1/encode", {"input": "hello there", "do_preprocess": True})
    expected = post(tiny_server, "/tokenize", {"messages": MESSAGES})["tokens"]
    assert reply == {"input_ids": expected, "length": len(expected)}
    assert chat(tiny_server, max_tokens=1)["usage"]["prompt_tokens"] == len(expected)


def test_tokenize_a_prompt_and_messages(tiny_server):
    reply = post(tiny_server, "/tokenize", {"model": "tiny", "prompt": "hello world"})
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 256
    assert reply["tokens"] == post(tiny_server, "/v1/encode", {"input": "hello world", "add_bos": False})["input_ids"]
    with_prompt = post(tiny_server, "/tokenize", {"messages": MESSAGES})
    without = post(tiny_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert with_prompt["tokens"][: without["count"]] == without["tokens"]
    assert with_prompt["count"] > without["count"]
    text = post(tiny_server, "/detokenize", {"tokens": with_prompt["tokens"]})["prompt"]
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", ["hello world", "  spaces\tand\nlines ", "你好，世界！🙂", "def f(x):\n    return x"])
def test_detokenize_round_trip(tiny_server, text):
    ids = post(tiny_server, "/tokenize", {"prompt": text})["tokens"]
    assert post(tiny_server, "/detokenize", {"model": "tiny", "tokens": ids}) == {"prompt": text}


def test_models_list_the_context_length(tiny_server):
    reply = httpx.get(tiny_server.base_url + "/v1/models", timeout=30).json()
    assert reply["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in reply["data"]] == [("tiny", "model", 256)]
