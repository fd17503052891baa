"""The chat workload both benchmarks send (no torch here: the HTTP benchmark runs
against any server from any environment with httpx)."""

from __future__ import annotations

BASE = ("The history of computing is longer than the history of computing hardware and modern "
        "computing technology, and includes methods for pen and paper. ")


def request_text(i: int) -> str:
    """The user message of request ``i`` (about 30 to 300 tokens as a chat prompt)."""
    return BASE * (1 + (i * 5) % 11) + f"Question {i}: summarize the text above in detail."


def output_tokens(i: int, max_tokens: int) -> int:
    """Request ``i``'s output length: max_tokens for the first, then down to half of it."""
    return max_tokens - (max_tokens // 2) * (i % 4) // 3
