"""Continuous batching: which sequences run in the next step, and how many tokens each.

One rule covers every case: each scheduled sequence computes
``min(uncomputed tokens, budget)`` tokens, so prefill chunks, decodes,
prefix-cache hits and recompute after preemption share one path. Order is
first come, first served: running sequences first (oldest first), then
waiting ones while the batch, the prefill budget and the free blocks allow.
When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it waits to be recomputed.

With ``batch_invariant`` a prompt is cut into chunks only at multiples of
``max_prefill_token_num`` (its positions, not the budget left by the other
sequences): a chunk that does not fit the step's budget waits for a later step
rather than shrink. So a prompt is prefilled in the same chunks, attended the
same way, whatever runs beside it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lmserve.backends.torch.block_manager import BlockManager
from lmserve.backends.torch.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    #: (sequence, number of tokens to compute this step), decodes first.
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    #: Sequences that can never run (with why); the engine finishes them with an error.
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch_size: int, max_prefill_token_num: int,
                 batch_invariant: bool = False):
        if max_batch_size < 1 or max_prefill_token_num < 1:
            raise ValueError("max_batch_size and max_prefill_token_num must be at least 1")
        self.block_manager = block_manager
        self.batch_invariant = batch_invariant
        self.max_batch_size = max_batch_size
        self.max_prefill_token_num = max_prefill_token_num
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival_index)

    def remove(self, seq: Sequence, keep_under: str | None = None) -> None:
        """Take ``seq`` out (finished or aborted) and free its blocks, or keep
        them for an interactive session's next turn under ``keep_under``."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if keep_under is None:
            self.block_manager.free(seq)
        else:
            self.block_manager.keep(keep_under, seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_prefill_token_num
        decodes: list[tuple[Sequence, int]] = []
        prefills: list[tuple[Sequence, int]] = []

        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            is_decode = seq.num_uncomputed_tokens == 1
            chunk = 1 if is_decode else self._chunk(seq, budget)
            if not chunk:
                continue
            while True:
                n = self.block_manager.allocate(seq, chunk)
                if n:
                    break
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if is_decode:
                decodes.append((seq, n))
            else:
                budget -= n
                prefills.append((seq, n))

        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            reason = self._never_fits(seq)
            if reason:
                self.waiting.pop(0)
                out.rejected.append((seq, reason))
                continue
            chunk = self._chunk(seq, budget)
            n = chunk and self.block_manager.allocate(seq, chunk)
            if not n:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_index)
            budget -= n
            (decodes if seq.num_uncomputed_tokens == 1 and n == 1 else prefills).append((seq, n))

        out.scheduled = decodes + prefills
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """The most tokens ``seq``'s next prefill chunk may have this step (0: it waits).
        Batch invariant: up to the next multiple of the prefill cap, whole or not at all."""
        if not self.batch_invariant:
            return budget
        cap = self.max_prefill_token_num
        chunk = min(seq.num_uncomputed_tokens, cap - seq.num_computed_tokens % cap)
        return chunk if chunk <= budget else 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _never_fits(self, seq: Sequence) -> str | None:
        """Why ``seq`` can never run, even alone in an empty cache; None when it can."""
        manager = self.block_manager
        longest = seq.num_prompt_tokens + seq.sampling_params.max_tokens
        needed = manager.blocks_for(longest)
        if needed > manager.num_blocks:
            return (
                f"The request needs up to {longest} tokens ({needed} KV-cache blocks of "
                f"{manager.block_size}), but the cache holds only {manager.num_blocks} blocks "
                f"({manager.num_blocks * manager.block_size} tokens). Lower max_tokens or give "
                "the cache more memory (--cache-max-entry-count)."
            )
        return None
