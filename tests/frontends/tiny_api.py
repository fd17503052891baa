"""What the API feature tests share: requests to the live tiny server
(``tiny_server``), the greedy reference text, and readers of replies.

Imported by test_n_choices.py, test_stop_strings.py, test_stop_tokens.py,
test_min_tokens.py, test_logprobs.py, test_echo.py, test_completion_prompts.py,
test_request_variants.py and test_model_and_tokenizer_routes.py. Where texts
are compared the decoding is greedy (``temperature=0``), so the same prompt
gives the same tokens however the request is shaped.
"""

import pytest

from conftest import post

MESSAGES = [{"role": "user", "content": "hello there"}]
PROMPT = "The quick brown fox"
EOS = 322  # <|im_end|> of the tiny tokenizer (tests/tiny_tokenizer.py)
BOS = 320  # <|endoftext|>


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


def pick_stop(text: str, starts: list[int], length: int = 4) -> str:
    """A stop string from the middle of ``text`` that spans a token boundary and
    does not occur earlier; no replacement characters (bytes of a split character)."""
    for offset in starts[1:]:
        start = offset - length // 2
        stop = text[start:start + length]
        if start > 4 and len(stop) == length and "\ufffd" not in stop and text.find(stop) == start:
            return stop
    pytest.fail(f"no usable stop string in {text!r}")


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


@pytest.fixture(scope="module")
def greedy(tiny_server):
    """The greedy text of ``PROMPT`` with its tokens and their offsets (import it to use it)."""
    return greedy_tokens(tiny_server)
