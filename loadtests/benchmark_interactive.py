"""Time to first token of a chat's next turn: interactive session vs. full history.

    python loadtests/benchmark_interactive.py [--url http://127.0.0.1:23333] [--history-tokens 1500]

Builds a conversation of about ``--history-tokens`` tokens through
``/v1/chat/interactive`` (the server keeps its KV cache), then times the next
turn's first token two ways, alternating, ``--repeats`` times each:

- interactive: the new question alone to ``/v1/chat/interactive`` on the
  session (only the new turn is computed);
- full history: the whole conversation (questions and the replies the
  session gave) plus the same question to ``/v1/chat/completions``; the
  server must run without ``--enable-prefix-caching``, so every token of the
  history is computed again.

Before each repeat the session is rebuilt (ended, then the same questions
asked again; greedy replies come out the same), so every repeat measures the
same history.

Without ``--url`` the script starts ``lmserve serve api_server`` on the real
model (no prefix caching) and stops it at the end. Prints a table of median
TTFTs and their ratio; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx

from local_server import local_server  # loadtests/, the script's own folder

TOPIC = ("The history of computing is longer than the history of computing hardware and modern computing "
         "technology, and includes methods for pen and paper. ")
QUESTION = "Summarize everything we have talked about in one sentence."
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
SESSION_ID = 4242


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="A running lmserve (without prefix caching); default: start one.")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="MODEL for the server this script starts.")
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    with _server(args.url, args.model) as url:
        client = httpx.Client(base_url=url, timeout=600)
        model = client.get("/v1/models").json()["data"][0]["id"]
        messages, history_tokens = build_history(client, args.history_tokens)
        interactive, full = [], []
        for _ in range(args.repeats):
            rebuild(client, messages)
            interactive.append(ttft_interactive(client))
            full.append(ttft_full_history(client, model, messages))
        _end(client)

    ours, theirs = statistics.median(interactive), statistics.median(full)
    print(f"\nhistory: {history_tokens} tokens, {len(messages) // 2} turns; median of {args.repeats}\n")
    print("| next turn through | TTFT (ms) |")
    print("|---|---:|")
    print(f"| /v1/chat/interactive (history kept on the server) | {ours * 1000:.1f} |")
    print(f"| /v1/chat/completions (full history, no prefix caching) | {theirs * 1000:.1f} |")
    print(f"\ninteractive / full history: {ours / theirs:.3f}x")
    return 0


def build_history(client: httpx.Client, history_tokens: int) -> tuple[list[dict], int]:
    """Turns of long questions and short greedy replies until the session holds
    ``history_tokens``; returns the conversation as OpenAI messages, and its tokens."""
    _end(client)
    messages: list[dict] = []
    history = 0
    while history < history_tokens:
        question = TOPIC * 3 + f"Question {len(messages) // 2 + 1}: what is the main point above?"
        reply = _turn(client, question, request_output_len=32)
        history = reply["history_tokens"] + reply["input_tokens"] + reply["tokens"]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply["text"]}]
    return messages, history


def rebuild(client: httpx.Client, messages: list[dict]) -> None:
    """A fresh session holding ``messages``, with their KV cache computed: each
    question is a turn whose reply is the one recorded (greedy gives it again)."""
    _end(client)
    for question in messages[0::2]:
        _turn(client, question["content"], request_output_len=32)


def ttft_interactive(client: httpx.Client) -> float:
    body = {"prompt": QUESTION, "session_id": SESSION_ID, "interactive_mode": True, "stream": True,
            "request_output_len": 16, **GREEDY}
    return _first_line_after(client, "/v1/chat/interactive", body, lambda line: json.loads(line)["tokens"] > 0)


def ttft_full_history(client: httpx.Client, model: str, messages: list[dict]) -> float:
    body = {"model": model, "messages": [*messages, {"role": "user", "content": QUESTION}], "stream": True,
            "max_tokens": 16, **GREEDY}

    def has_content(line: str) -> bool:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False
        choices = json.loads(line[6:])["choices"]
        return bool(choices and choices[0]["delta"].get("content"))

    return _first_line_after(client, "/v1/chat/completions", body, has_content)


def _first_line_after(client: httpx.Client, path: str, body: dict, is_first_token) -> float:
    start = time.perf_counter()
    with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line and is_first_token(line):
                return time.perf_counter() - start
    raise RuntimeError(f"{path} sent no token")


def _turn(client: httpx.Client, prompt: str, **fields) -> dict:
    body = {"prompt": prompt, "session_id": SESSION_ID, "interactive_mode": True, **GREEDY, **fields}
    response = client.post("/v1/chat/interactive", json=body)
    response.raise_for_status()
    return response.json()


def _end(client: httpx.Client) -> None:
    client.post("/v1/chat/interactive", json={"prompt": "", "session_id": SESSION_ID, "request_output_len": 0,
                                              "interactive_mode": False}).raise_for_status()


def _server(url: str | None, model: str):
    return local_server(url, model, ["--session-len", "4096"], start_timeout_s=300, stop_timeout_s=30)


if __name__ == "__main__":
    sys.exit(main())
