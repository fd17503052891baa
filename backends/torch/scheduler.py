"""Continuous batching: which sequences run in the next step, and how many tokens each.

One rule covers every case: each scheduled sequence computes
``min(uncomputed tokens, its part of the budget)`` tokens, so prefill chunks,
decodes, prefix-cache hits and recompute after preemption share one path.

Fair among requests, first come, first served within one. A request is a
group of sequences (an API request's choices and prompts share a
``group_id``), and no request may starve the others:

- Rows. A step runs at most ``max_batch_size`` sequences. A waiting sequence
  starts while the batch has room, or while its request holds fewer rows than
  its fair share (``max_batch_size`` // requests with work), even when the
  batch is full: then the step's rows are dealt one per request in turn, and
  the newest rows of the requests above their share pause (they keep their
  blocks and resume when rows free up). So a one-sequence chat that arrives
  while ``n: 128`` fills the batch runs in the next step, at the cost of one of
  the big request's rows, with nothing recomputed.
- Starts. While a request holds more rows than its fair share, a step that
  starts sequences runs only prefills (the running decodes wait one step),
  unless the step before did: a newcomer's first token then waits for the step
  in flight and one short step, not for a full step of the whole batch; decodes
  still run at least every other step. Among requests within their shares
  (many users of one or a few rows each) starts join the decode step, as before:
  no throughput is lost where nobody hogs the batch.
- Prefill budget. ``max_prefill_token_num`` is shared among the requests with
  tokens to prefill: the one with the fewest tokens first, each taking at most
  an equal part of what is left (what it leaves goes to the next), so a short
  prompt is prefilled in the next step beside a long prompt's chunk.
- Memory. When a running sequence needs a block and none is free, the newest
  sequence of the request holding the most rows (not yet scheduled in this
  step) is preempted: its blocks are freed and it waits to be recomputed. A
  starting sequence that finds no free blocks stops the others from starting.

With ``batch_invariant`` a prompt is cut into chunks only at multiples of
``max_prefill_token_num`` (its positions, not the budget left by the other
sequences): a chunk that does not fit the step's budget waits for a later step
rather than shrink. So a prompt is prefilled in the same chunks, attended the
same way, whatever runs beside it. Chunks are then taken whole, fewest tokens
first; a prefill that waited goes first in the next step (``prefill_deferred``),
so a long prompt and a stream of short ones take turns.
"""

from __future__ import annotations

import bisect
import collections
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
        #: Sorted by arrival; sequences holding blocks, paused ones included (so
        #: there may be more than ``max_batch_size``).
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._memory_full = False  # in this step, a starting sequence found no free blocks
        self._last_started_alone = False  # the last step ran prefills only, to start sequences

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
        starting = self._starting(out)
        is_starting = set(starting)
        scheduled: set[Sequence] = set()
        decoding: list[Sequence] = []
        wanting_prefill: list[Sequence] = []
        for seq in self._rows(self.running + starting):
            if seq.status is SequenceStatus.WAITING:
                wanting_prefill.append(seq)  # starting
            elif seq.num_uncomputed_tokens > 1:
                wanting_prefill.append(seq)
            else:
                decoding.append(seq)
        # A step that starts sequences beside a request holding more than its share of
        # the batch runs only prefills, unless the last one did.
        starts_alone = bool(starting) and not self._last_started_alone and self._crowded()
        decodes = [] if starts_alone else self._decode(decoding, scheduled, out)
        self._memory_full = False
        prefills = self._prefill(wanting_prefill, is_starting, scheduled, out)
        if starts_alone and not prefills:  # nothing could start: the decodes run after all
            starts_alone = False
            decodes = self._decode(decoding, scheduled, out)
        self._last_started_alone = starts_alone
        # A session's next turn may have only its last token left to compute: a decode.
        decodes += [(seq, n) for seq, n in prefills if seq.num_uncomputed_tokens == 1]
        prefills = [(seq, n) for seq, n in prefills if seq.num_uncomputed_tokens > 1]
        decodes.sort(key=lambda row: row[0].arrival_index)
        prefills.sort(key=lambda row: row[0].arrival_index)
        out.scheduled = decodes + prefills
        return out

    def _decode(self, seqs: list[Sequence], scheduled: set[Sequence], out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """A block, where needed, for the next token of each of ``seqs`` still running."""
        decodes = []
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING and (n := self._allocate_running(seq, 1, scheduled, out)):
                decodes.append((seq, n))
                scheduled.add(seq)
        return decodes

    def _starting(self, out: SchedulerOutput) -> list[Sequence]:
        """The waiting sequences that may start this step, fewest rows of their request first:
        while the batch has room, or while their request holds fewer rows than its fair
        share. Those that can never run are rejected here."""
        if not self.waiting:
            return []
        rows = collections.Counter(seq.group_id for seq in self.running)
        share = self._fair_share(rows)
        room = self.max_batch_size - len(self.running)
        starting = []
        for seq in sorted(self.waiting, key=lambda s: (rows[s.group_id], s.arrival_index)):
            reason = self._never_fits(seq)
            if reason:
                self.waiting.remove(seq)
                out.rejected.append((seq, reason))
            elif room > 0 or rows[seq.group_id] < share:
                starting.append(seq)
                room -= 1
                rows[seq.group_id] += 1
        return starting

    def _crowded(self) -> bool:
        """Whether a request holds more rows than its fair share (one hogs the batch)."""
        rows = collections.Counter(seq.group_id for seq in self.running)
        return bool(rows) and max(rows.values()) > self._fair_share(rows)

    def _fair_share(self, rows: collections.Counter) -> int:
        """Rows of the batch each request with work may hold while others wait."""
        groups = set(rows).union(seq.group_id for seq in self.waiting)
        return max(1, self.max_batch_size // len(groups))

    def _rows(self, seqs: list[Sequence]) -> list[Sequence]:
        """At most ``max_batch_size`` of ``seqs`` for this step, taken one per request in
        turn (requests in the order of ``seqs``, each one's sequences in order). The same
        ones are taken step after step; the others pause, keeping their blocks."""
        if len(seqs) <= self.max_batch_size:
            return seqs
        by_group: dict[str, collections.deque[Sequence]] = {}
        for seq in seqs:
            by_group.setdefault(seq.group_id, collections.deque()).append(seq)
        taken: set[Sequence] = set()
        groups = list(by_group.values())
        while len(taken) < self.max_batch_size:
            groups = [members for members in groups if members]
            for members in groups[: self.max_batch_size - len(taken)]:
                taken.add(members.popleft())
        return [seq for seq in seqs if seq in taken]

    def _allocate_running(self, seq: Sequence, chunk: int, scheduled: set[Sequence], out: SchedulerOutput) -> int:
        """Blocks for running ``seq``'s next ``chunk`` tokens, preempting while none are free
        (the newest sequence of the request with the most rows, among those not yet
        scheduled in this step, ``seq`` included); 0 when ``seq`` itself was preempted."""
        while True:
            n = self.block_manager.allocate(seq, chunk)
            if n:
                return n
            rows = collections.Counter(s.group_id for s in self.running)
            victim = max((s for s in self.running if s not in scheduled),
                         key=lambda s: (rows[s.group_id], s.arrival_index))
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return 0

    def _prefill(self, seqs: list[Sequence], starting: set[Sequence], scheduled: set[Sequence],
                 out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Share the prefill budget among the requests of ``seqs`` (running sequences with
        tokens to compute, and starting ones), the request with the fewest tokens to
        compute first. Each gets at most an equal part of what is left (what it does not
        use goes to the next), its sequences oldest first. With ``batch_invariant`` chunks
        are whole: each request in that order takes those that fit, and a request whose
        prefill got nothing goes first in the next step."""
        by_group: dict[str, list[Sequence]] = {}
        for seq in seqs:
            by_group.setdefault(seq.group_id, []).append(seq)

        def priority(members: list[Sequence]):
            demand = sum(s.num_uncomputed_tokens for s in members)
            return (not members[0].prefill_deferred, demand) if self.batch_invariant else demand

        order = sorted(by_group.values(), key=priority)
        budget = self.max_prefill_token_num
        prefills: list[tuple[Sequence, int]] = []
        for index, members in enumerate(order):
            share = budget if self.batch_invariant else -(-budget // (len(order) - index))
            taken = self._prefill_request(members, share, starting, scheduled, out)
            for seq in members:
                seq.prefill_deferred = not taken
            prefills += taken
            budget -= sum(n for _, n in taken)
        return prefills

    def _prefill_request(self, members: list[Sequence], budget: int, starting: set[Sequence],
                         scheduled: set[Sequence], out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Chunks of one request's prefills within ``budget``, oldest first. A starting
        sequence that finds no free blocks stops the others from starting (memory is first
        come, first served: nobody overtakes it)."""
        taken: list[tuple[Sequence, int]] = []
        for seq in members:
            is_starting = seq in starting
            if is_starting and self._memory_full or not is_starting and seq.status is not SequenceStatus.RUNNING:
                continue  # memory is short, or it was preempted earlier in this step
            chunk = self._chunk(seq, budget)
            if not chunk:
                continue
            if is_starting:
                n = self.block_manager.allocate(seq, chunk)
                self._memory_full = not n
                if n:
                    self._start(seq)
            else:
                n = self._allocate_running(seq, chunk, scheduled, out)
            if n:
                scheduled.add(seq)
                taken.append((seq, n))
                budget -= n
        return taken

    def _start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival_index)

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
