"""Stop strings: find them in a stream of text deltas, across token boundaries.

A stop string may arrive split over several deltas ("<|us" + "er|>"), so text
that could be the start of one is held back until the next delta settles it.
The streamed pieces therefore always concatenate to exactly the text a
non-streamed request returns.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Cuts a text stream before (or, with ``include_in_output``, after) the
    first occurrence of any of ``stops``."""

    def __init__(self, stops: Sequence[str], include_in_output: bool = False):
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.include_in_output = include_in_output
        self._held = ""

    def push(self, text: str, can_stop: bool = True) -> tuple[str, bool]:
        """Feed the next delta; return ``(text safe to emit now, matched)``.

        After a match the stream is over: the returned text ends at the stop
        string and later input is not expected. With ``can_stop`` False (e.g.
        before ``min_tokens``) nothing matches and nothing is held back.
        """
        text = self._held + text
        self._held = ""
        if not can_stop:
            return text, False
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            return text[: start + len(stop) if self.include_in_output else start], True
        keep = self._longest_partial_suffix(text)
        if keep:
            self._held = text[-keep:]
            text = text[:-keep]
        return text, False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it matched nothing)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The occurrence that is complete first (earliest end; then the longest).

        Ending first, not starting first, is what makes the cut independent of
        how the text was split into deltas: with stops "abcd" and "bc", "xabcd"
        is cut to "xa" whether it arrives whole or a character at a time.
        """
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index == -1:
                continue
            if best is None or (index + len(stop), index) < (best[0] + len(best[1]), best[0]):
                best = (index, stop)
        return best

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
