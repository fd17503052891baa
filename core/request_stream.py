"""One request's way back: the engine's outputs in, :class:`GenerationOutput`s out.

The bus routes; a :class:`RequestStream` turns one request's ids into what its
frontend yields. Each engine output goes through the same stages in order:

1. the clock: first-token time and the gaps between outputs;
2. text: the stop token itself is not text, and the detokenizer never emits
   half a UTF-8 character (:mod:`lmserve.core.detokenizer`);
3. stop strings: text that may begin one is held back until the next delta
   settles it (:mod:`lmserve.core.stop_strings`); a match finishes the request;
4. carry-over: ids and their logprobs whose text is still held back ride with
   the next output that has text, so the frontend never sees an empty delta
   and the ids it sees add up to exactly the ids the engine made.
"""

from __future__ import annotations

import time

from lmserve.core.detokenizer import IncrementalDetokenizer
from lmserve.core.stop_strings import StopStringMatcher
from lmserve.core.types import (
    EngineOutput,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestTiming,
    TokenLogprob,
    TokenUsage,
)


class RequestClock:
    """When one request's outputs arrived: arrival, first token, gaps after it."""

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self._previous = self.arrival
        self._gaps: list[float] = []

    def tick(self) -> None:
        """An output with new tokens arrived now."""
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        else:
            self._gaps.append(now - self._previous)
        self._previous = now

    def timing(self) -> RequestTiming:
        """The timing so far, finished now."""
        return RequestTiming(self.arrival, self.first_token, time.monotonic(), tuple(self._gaps))


class RequestStream:
    """Turns one request's :class:`EngineOutput`s into :class:`GenerationOutput`s.

    :param request: the request, with its ``request_id`` assigned.
    :param tokenizer: decodes the output ids.
    :param stop_ids: the ids that end it (:meth:`SamplingParams.stop_ids`); the one
        that does is not text.
    """

    def __init__(self, request: GenerationRequest, tokenizer, stop_ids: frozenset[int]):
        params = request.sampling_params
        self.request_id = request.request_id
        self.clock = RequestClock()
        self._min_tokens = params.min_tokens
        self._stop_ids = stop_ids
        self._detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stop_strings = (
            StopStringMatcher(request.stop, request.include_stop_str_in_output) if request.stop else None
        )
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self.num_output_tokens = 0
        # Ids (and their logprobs) whose text is still held back ride with the next text.
        self._pending_ids: tuple[int, ...] = ()
        self._pending_logprobs: tuple[TokenLogprob, ...] | None = () if params.logprobs is not None else None
        self._prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # until yielded
        #: The last output made, finished or not.
        self.last: GenerationOutput | None = None

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    def push(self, out: EngineOutput) -> GenerationOutput | None:
        """The output to yield for ``out``, or None while its text is held back.

        An output with ``finish_reason`` set is the last; push nothing after it.
        """
        if out.new_token_ids:
            self.clock.tick()
        self.num_output_tokens += len(out.new_token_ids)
        text, finish_reason = self._text(out)
        self._pending_ids += out.new_token_ids
        if self._pending_logprobs is not None:
            self._pending_logprobs += out.logprobs or ()
        if out.prompt_logprobs is not None:
            self._prompt_logprobs = out.prompt_logprobs
        self.last = GenerationOutput(
            self.request_id, text, self._pending_ids,
            TokenUsage(self._num_prompt_tokens, self.num_output_tokens, out.num_cached_tokens),
            finish_reason, out.error,
            timing=self.clock.timing() if finish_reason is not None else None,
            logprobs=self._pending_logprobs, prompt_logprobs=self._prompt_logprobs,
        )
        if finish_reason is not None:
            return self.last
        if not text:  # no empty deltas
            return None
        self._pending_ids = ()
        if self._pending_logprobs is not None:
            self._pending_logprobs = ()
        self._prompt_logprobs = None
        return self.last

    def abandoned(self) -> GenerationOutput:
        """The last output of a request whose consumer left before it finished."""
        self.last = GenerationOutput(
            self.request_id, "", (), TokenUsage(self._num_prompt_tokens, self.num_output_tokens),
            FinishReason.ABORT, timing=self.clock.timing(),
        )
        return self.last

    def _text(self, out: EngineOutput) -> tuple[str, FinishReason | None]:
        """The text ``out`` settles, and the finish reason once a stop string matched."""
        finish_reason = out.finish_reason
        text_ids = out.new_token_ids
        if finish_reason is FinishReason.STOP and text_ids and text_ids[-1] in self._stop_ids:
            text_ids = text_ids[:-1]  # the stop token itself is not text
        text = self._detokenizer.push(text_ids)
        if finish_reason is not None:
            text += self._detokenizer.flush()
        if self._stop_strings is None:
            return text, finish_reason
        text, matched = self._stop_strings.push(text, can_stop=self.num_output_tokens >= self._min_tokens)
        if matched:
            return text, FinishReason.STOP
        if finish_reason is not None:
            text += self._stop_strings.flush()
        return text, finish_reason
