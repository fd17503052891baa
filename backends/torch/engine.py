"""The engine's step: schedule, run the model, sample, post-process.

Single-threaded by design: the backend's thread owns the engine and is the
only caller. No hook is called in here.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from typing import NamedTuple

import torch

from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.sampler import Logprobs, suppress_stop_tokens
from lmserve.backends.torch.scheduler import Scheduler
from lmserve.backends.torch.sequence import Sequence, SequenceStatus
from lmserve.core.types import EngineOutput, EngineRequest, FinishReason, InvalidRequestError, TokenLogprob
from lmserve.core.validation import check_context_room, check_token_ids

logger = logging.getLogger(__name__)

#: (logits [N, vocab] float32, the N sequences) -> N sampled token ids
SampleFn = Callable[[torch.Tensor, list[Sequence]], list[int]]


class RowsSampledApart(NamedTuple):
    """What :meth:`LLMEngine._sample_rows_apart` recovers from a failed step."""

    #: By index into the step's scheduled sequences, as :meth:`ModelRunner.run` returns them.
    prompt_logprobs: dict[int, list[TokenLogprob]]
    #: One per sampled row (-1 where sampling failed).
    token_ids: list[int]
    sampled_logprobs: list[TokenLogprob | None]
    #: The sequences whose row broke the sampler, with the error they finish with.
    errors: dict[Sequence, str]


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sample: SampleFn, *,
                 eos_token_ids: tuple[int, ...], max_model_len: int):
        self.runner = runner
        self.scheduler = scheduler
        self.sample = sample
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    @property
    def block_manager(self):
        return self.scheduler.block_manager

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request: EngineRequest) -> EngineOutput | None:
        """Queue a request; an output (an error) when it can never run."""
        if request.request_id in self.sequences:
            return EngineOutput(request.request_id, (), FinishReason.ERROR,
                                f"Request id {request.request_id!r} is already running.")
        try:
            self._check_request(request)
        except InvalidRequestError as exc:
            return EngineOutput(request.request_id, (), FinishReason.ERROR, exc.message)
        params = request.sampling_params
        seq = Sequence(request, next(self._arrivals),
                       seed=random.getrandbits(63) if params.seed is None else params.seed,
                       stop_token_ids=params.stop_ids(self.eos_token_ids))
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)
        return None

    def _check_request(self, request: EngineRequest) -> None:
        """Raise :class:`InvalidRequestError` for a request that can never run: its prompt
        fills the context (``max_tokens`` past the context only ends it early, with
        ``length``), or it names token ids outside the vocabulary."""
        check_context_room(len(request.prompt_token_ids), None, self.max_model_len,
                           prompt_param="prompt_token_ids")
        vocab_size = self.runner.model.config.vocab_size
        params = request.sampling_params
        check_token_ids(request.prompt_token_ids, vocab_size, "prompt_token_ids")
        check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
        check_token_ids(params.logit_bias, vocab_size, "logit_bias")

    def abort_request(self, request_id: str) -> EngineOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT, ())

    def release_session(self, session_key: str) -> None:
        self.block_manager.release_session(session_key)

    def abort_all(self) -> list[EngineOutput]:
        return [self._finish(seq, FinishReason.ABORT, ()) for seq in list(self.sequences.values())]

    def step(self) -> list[EngineOutput]:
        """One iteration: every scheduled sequence computes its chunk; those
        that caught up with their tokens sample one more."""
        plan = self.scheduler.schedule()
        outputs = [self._finish(seq, FinishReason.ERROR, (), reason) for seq, reason in plan.rejected]
        if plan.is_empty:
            return outputs
        scheduled = plan.scheduled
        sample_rows = [i for i, (seq, n) in enumerate(scheduled) if seq.num_computed_tokens + n == seq.num_tokens]
        to_sample = [scheduled[i][0] for i in sample_rows]
        try:
            logits, prompt_logprobs = self.runner.run(scheduled, sample_rows, self.block_manager.take_fresh_blocks())
            token_ids, sampled_logprobs = self._sample(logits, to_sample)
        except Exception as exc:
            logger.exception("An engine step failed; sampling its rows one by one.")
            failed = self._sample_rows_apart(scheduled, sample_rows)
            if failed is None:  # the forward pass itself failed: fail the step's requests
                message = f"The engine failed: {type(exc).__name__}: {exc}"
                return outputs + [self._finish(seq, FinishReason.ERROR, (), message) for seq, _ in scheduled]
            errors = failed.errors
            for seq, error in errors.items():  # only the requests that broke the sampler fail
                outputs.append(self._finish(seq, FinishReason.ERROR, (), error))
            kept = [k for k, seq in enumerate(to_sample) if seq not in errors]
            to_sample = [to_sample[k] for k in kept]
            token_ids = [failed.token_ids[k] for k in kept]
            sampled_logprobs = [failed.sampled_logprobs[k] for k in kept]
            prompt_logprobs = {i: r for i, r in failed.prompt_logprobs.items() if scheduled[i][0] not in errors}
        for i, chunk_records in prompt_logprobs.items():
            seq = scheduled[i][0]
            # After a preemption the prompt is computed again: keep the first records.
            known = len(seq.prompt_logprobs) - 1 - seq.num_computed_tokens
            seq.prompt_logprobs.extend(chunk_records[max(known, 0):])
        for seq, n in scheduled:
            if seq.is_finished:  # failed above
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        for seq, token_id, logprob in zip(to_sample, token_ids, sampled_logprobs):
            seq.token_ids.append(token_id)
            outputs.append(self._after_token(seq, token_id, logprob))
        return outputs

    def _sample(self, logits, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Sample one token per row of ``logits`` (which it overwrites), with logprobs where asked."""
        logprobs = Logprobs(logits, seqs)
        suppress_stop_tokens(logits, seqs)
        token_ids = self.sample(logits, seqs) if seqs else []
        return token_ids, logprobs.records(token_ids)

    def _sample_rows_apart(self, scheduled: list[tuple[Sequence, int]],
                           sample_rows: list[int]) -> RowsSampledApart | None:
        """After a failed step: run the forward again (it rewrites the same keys and
        values into the same slots) and sample each row alone, so one request that
        breaks the sampler fails alone. None when the forward pass itself fails."""
        try:
            logits, prompt_logprobs = self.runner.run(scheduled, sample_rows)
        except Exception:
            return None
        to_sample = [scheduled[i][0] for i in sample_rows]
        token_ids, sampled_logprobs, errors = [], [], {}
        for row, seq in enumerate(to_sample):
            try:
                (token_id,), (logprob,) = self._sample(logits[row : row + 1], [seq])
            except Exception as row_exc:
                errors[seq] = f"The engine failed: {type(row_exc).__name__}: {row_exc}"
                token_id, logprob = -1, None
            token_ids.append(token_id)
            sampled_logprobs.append(logprob)
        return RowsSampledApart(prompt_logprobs, token_ids, sampled_logprobs, errors)

    def _after_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> EngineOutput:
        params = seq.sampling_params
        logprobs = None if logprob is None else (logprob,)
        # The prompt's logprobs ride with the first new token.
        prompt_logprobs = (tuple(seq.prompt_logprobs)
                           if seq.prompt_logprobs is not None and seq.num_output_tokens == 1 else None)
        constraint = seq.request.constraint
        if token_id in seq.stop_token_ids:
            reason = FinishReason.STOP
        elif constraint is not None and not constraint.accept(token_id):
            return self._finish(seq, FinishReason.ERROR, (), f"The response format's grammar refused token "
                                f"{token_id}: {constraint.error}")
        elif constraint is not None and constraint.is_finished():  # nothing may follow but the end
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        else:
            return EngineOutput(seq.request_id, (token_id,), num_cached_tokens=seq.num_cached_tokens,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        return self._finish(seq, reason, (token_id,), logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason, token_ids: tuple[int, ...],
                error: str | None = None, logprobs: tuple[TokenLogprob, ...] | None = None,
                prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None) -> EngineOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        request = seq.request
        # A failed step may have left its keys and values half written: keep nothing then.
        keep = request.keep_kv and request.session_key is not None and reason is not FinishReason.ERROR
        self.scheduler.remove(seq, keep_under=request.session_key if keep else None)
        del self.sequences[seq.request_id]
        return EngineOutput(seq.request_id, token_ids, reason, error, seq.num_cached_tokens, logprobs,
                            prompt_logprobs)
