"""What the load tests check in every response: pure functions over what a server sent.

Each returns a list of problems (empty: the response is right), so a locust user
fails the request with them, and a unit test can feed recorded bad responses.
No locust or httpx here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

FINISH_REASONS = {"stop", "length"}


def _usage_problems(usage: dict | None, max_tokens: int, completions: int = 1) -> list[str]:
    if not usage:
        return ["no usage"]
    problems = []
    prompt, completion, total = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if not isinstance(prompt, int) or prompt < 1:
        problems.append(f"usage.prompt_tokens is {prompt!r}")
    if not isinstance(completion, int) or not 1 <= completion <= max_tokens * completions:
        problems.append(f"usage.completion_tokens is {completion!r} (max_tokens {max_tokens} x {completions})")
    if isinstance(prompt, int) and isinstance(completion, int) and total != prompt + completion:
        problems.append(f"usage.total_tokens {total} != {prompt} + {completion}")
    return problems


def _finish_problems(finish_reason, completion_tokens, max_tokens: int) -> list[str]:
    if finish_reason not in FINISH_REASONS:
        return [f"finish_reason {finish_reason!r}"]
    if finish_reason == "length" and completion_tokens != max_tokens:
        return [f"finish_reason length after {completion_tokens} of max_tokens {max_tokens}"]
    return []


def check_chat(body: dict, max_tokens: int) -> list[str]:
    """A non-streamed chat completion with one choice."""
    choices = body.get("choices") or []
    if len(choices) != 1:
        return [f"{len(choices)} choices"]
    message = choices[0].get("message") or {}
    problems = _usage_problems(body.get("usage"), max_tokens)
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        problems.append(f"message {message!r}")
    usage = body.get("usage") or {}
    return problems + _finish_problems(choices[0].get("finish_reason"), usage.get("completion_tokens"), max_tokens)


def parse_stream(lines: Iterable[str]) -> tuple[list[dict], list[str]]:
    """Server-sent events -> (the JSON chunks, problems): every event a ``data:`` line of
    JSON, ending with ``data: [DONE]`` and nothing after it."""
    chunks, problems, done = [], [], False
    for line in lines:
        if not line:
            continue
        if done:
            problems.append(f"data after [DONE]: {line[:80]!r}")
            break
        if line == "data: [DONE]":
            done = True
            continue
        if not line.startswith("data: "):
            problems.append(f"not an SSE data line: {line[:80]!r}")
            continue
        try:
            chunk = json.loads(line[6:])
        except json.JSONDecodeError:
            problems.append(f"not JSON: {line[:80]!r}")
            continue
        if "error" in chunk:
            problems.append(f"error event: {chunk['error']}")
        chunks.append(chunk)
    if not done:
        problems.append("the stream ended without [DONE]")
    return chunks, problems


def check_chat_stream(lines: Iterable[str], max_tokens: int) -> tuple[str, list[str]]:
    """A streamed chat completion asked with ``stream_options.include_usage``: (its text, problems).
    One role chunk first, content deltas, exactly one finish_reason, then a usage chunk."""
    chunks, problems = parse_stream(lines)
    text, finishes, usage = [], [], None
    for chunk in chunks:
        if chunk.get("usage") and not chunk.get("choices"):
            usage = chunk["usage"]
            continue
        for choice in chunk.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason") is not None:
                finishes.append(choice["finish_reason"])
    if chunks and ((chunks[0].get("choices") or [{}])[0].get("delta") or {}).get("role") != "assistant":
        problems.append("the first chunk does not name the assistant role")
    if len(finishes) != 1:
        problems.append(f"{len(finishes)} finish reasons")
    problems += _usage_problems(usage, max_tokens)
    if finishes and usage:
        problems += _finish_problems(finishes[-1], usage.get("completion_tokens"), max_tokens)
    return "".join(text), problems


def check_completions(body: dict, prompts: int, max_tokens: int, echo_prefixes: list[str] | None = None,
                      logprobs: bool = False) -> list[str]:
    """A non-streamed /v1/completions answer for a list of ``prompts`` prompts (one choice
    each, in order); ``echo_prefixes``: the prompts, which each text must start with;
    ``logprobs`` (without echo): one logprob per generated token."""
    choices = body.get("choices") or []
    if sorted(c.get("index") for c in choices) != list(range(prompts)):
        return [f"choice indexes {[c.get('index') for c in choices]} for {prompts} prompts"]
    problems = _usage_problems(body.get("usage"), max_tokens, prompts)
    counted = 0
    for choice in sorted(choices, key=lambda c: c["index"]):
        text = choice.get("text")
        if not isinstance(text, str):
            problems.append(f"choice {choice['index']} text {text!r}")
            continue
        if echo_prefixes is not None and not text.startswith(echo_prefixes[choice["index"]]):
            problems.append(f"choice {choice['index']} does not echo its prompt")
        if choice.get("finish_reason") not in FINISH_REASONS:
            problems.append(f"choice {choice['index']} finish_reason {choice.get('finish_reason')!r}")
        if logprobs:
            counted += len((choice.get("logprobs") or {}).get("tokens") or [])
    if logprobs and echo_prefixes is None and body.get("usage"):
        if counted != body["usage"].get("completion_tokens"):
            problems.append(f"{counted} logprobs for {body['usage'].get('completion_tokens')} completion tokens")
    return problems


def check_retokenized(text: str, completion_tokens: int, finish_reason: str, count: int) -> list[str]:
    """The text's own token count (``count``, from the server's /tokenize) against the usage.

    The generated tokens are not always the text's canonical tokens (a model may emit
    "Hel" + "lo" where the tokenizer writes "Hello", or a character one byte token at
    a time where the tokenizer has it whole), and a stop token is counted but not
    shown, so a difference of a token or 5%, plus a token for each byte past the first
    of every non-ASCII character, passes; more means the usage or the text is wrong."""
    expected = completion_tokens - (finish_reason == "stop")
    byte_tokens = len(text.encode()) - len(text)
    if abs(count - expected) > max(1, expected // 20) + byte_tokens:
        return [f"the text re-tokenizes to {count} tokens; usage says {completion_tokens} ({finish_reason})"]
    return []


def check_interactive_stream(lines: Iterable[str], history_before: int) -> tuple[dict | None, list[str]]:
    """A streamed /v1/chat/interactive turn (JSON lines): (its last reply, problems).

    The session's history grows by exactly the previous turn's input and output: every
    reply says ``history_tokens == history_before`` (0 for a first turn, else the previous
    turn's history + input_tokens + tokens)."""
    replies, problems = [], []
    for line in lines:
        if not line:
            continue
        try:
            replies.append(json.loads(line))
        except json.JSONDecodeError:
            problems.append(f"not JSON: {line[:80]!r}")
    if not replies:
        return None, problems + ["no reply"]
    last = replies[-1]
    if last.get("finish_reason") not in FINISH_REASONS:
        problems.append(f"finish_reason {last.get('finish_reason')!r} ({last.get('error')})")
    if any(r.get("history_tokens") != history_before for r in replies):
        problems.append(f"history_tokens {[r.get('history_tokens') for r in replies][-1]}, expected {history_before}")
    if not isinstance(last.get("tokens"), int) or last["tokens"] < 1:
        problems.append(f"tokens {last.get('tokens')!r}")
    return last, problems


def check_error(status: int, body: dict | None, expected_status: int) -> list[str]:
    """A refused request: the expected 4xx, in OpenAI's error shape."""
    problems = [] if status == expected_status else [f"status {status}, expected {expected_status}"]
    error = (body or {}).get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        problems.append(f"not an OpenAI error body: {str(body)[:120]}")
    return problems
