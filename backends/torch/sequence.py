"""One request's mutable state inside the engine; nobody outside the engine sees it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lmserve.core.types import EngineRequest, FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request as the engine runs it.

    ``token_ids`` holds the prompt and every token generated so far; each step
    lets ``num_computed_tokens`` (tokens whose keys and values are in the
    cache) catch up with ``num_tokens``. Chunked prefill, prefix-cache hits
    and recompute after preemption all follow from that one rule.
    """

    request: EngineRequest
    arrival_index: int
    #: The sampling seed: the request's, or a random one drawn on arrival.
    seed: int = 0
    #: The ids that end it (``SamplingParams.stop_ids`` of the model's EOS ids),
    #: computed once by the engine on arrival.
    stop_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    #: Prompt tokens found in the prefix cache when the sequence was scheduled.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    #: Hashes of the full blocks of ``block_table`` that are registered in the prefix cache.
    block_hashes: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    #: With ``prompt_logprobs``: one per prompt token computed so far (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    #: Its prefill waited in the last step while other requests' chunks took the budget:
    #: it goes first in the next (see :mod:`~lmserve.backends.torch.scheduler`).
    prefill_deferred: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def group_id(self) -> str:
        """The request it belongs to: the choices and prompts of one API request share it,
        and the scheduler is fair among groups. A request without one is its own group."""
        return self.request.group_id or self.request.request_id

    @property
    def sampling_params(self) -> SamplingParams:
        return self.request.sampling_params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
