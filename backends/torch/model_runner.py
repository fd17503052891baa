"""Turns a scheduled step into tensors, runs the model, returns the logits to sample.

The step's tokens are laid out ``[decodes | prefill chunk 1 | chunk 2 | ...]`` by
:class:`~lmserve.backends.torch.step_layout.StepLayout` (slot arithmetic, block
tables, masks); this module chooses the path a step takes (compiled, graphed,
eager, or a mixed step run apart) and executes it.

A step is first laid out as a :class:`StepPlan` (tensors only, no sequences), then
executed. Under tensor parallelism rank 0 sends the plan to the other ranks, and
every rank executes it on its own part of the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from lmserve.backends.torch.attention import IN_PLACE_DECODE_DTYPES, DecodeTables, PagedAttentionMetadata
from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.decode_graphs import DecodeGraphs
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.sampler import logprob_records
from lmserve.backends.torch.sequence import Sequence
from lmserve.backends.torch.step_layout import StepLayout, num_leading_decodes, token_layout
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel, move_to
from lmserve.core.types import TokenLogprob

if TYPE_CHECKING:
    from lmserve.backends.torch.ranks import RankProcesses

logger = logging.getLogger(__name__)

#: Prompt rows turned into full-vocabulary logprobs at a time (256 x 49,152 floats: 50 MB).
PROMPT_LOGPROBS_ROWS = 256


class StepPlan(NamedTuple):
    """What every rank computes in one step."""

    #: Blocks handed out for the first time: cleared before the step writes them.
    fresh_blocks: tuple[int, ...]
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: PagedAttentionMetadata | DecodeTables
    #: Whether the compiled decode step computes it.
    compiled: bool
    #: The rows whose logits are sampled (one per sampling sequence).
    sample_rows: torch.Tensor
    #: ``[first, last)`` row ranges whose logits give prompt logprobs, a slice at a time.
    prompt_rows: tuple[tuple[int, int], ...] = ()


class PromptLogprobSlice(NamedTuple):
    """Rank 0's side of one of :attr:`StepPlan.prompt_rows`: whose prompt tokens it scores."""

    index: int  # into the step's scheduled sequences
    targets: list[int]
    top_k: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, device: torch.device,
                 decode_in_place: bool | None = None,
                 weights: str = "", compile_decodes: bool = False, parallel: TensorParallel = SINGLE,
                 decode_graphs: DecodeGraphs | None = None, batch_invariant: bool = False):
        """``decode_in_place``: decodes attend by reading the cache in place (a
        Numba kernel) rather than gathering their contexts; default: on the CPU,
        for float32 and bfloat16 caches. ``weights`` says what the weights are
        (dtype, quantization and why), for the start-up line. ``compile_decodes``:
        steps of decodes only run as one compiled graph
        (:class:`~lmserve.backends.torch.compiled_step.CompiledDecodeStep`; needs ``decode_in_place``,
        one rank and a model whose ``compiled_decodes`` allows it). ``parallel``: this rank's place
        under tensor parallelism. ``decode_graphs``: steps of decodes only that fit them run
        through these (:mod:`~lmserve.backends.torch.decode_graphs`; CUDA graphs, one rank, the
        model's ``compiled_decodes`` again).
        ``batch_invariant``: a step that mixes decodes and prefill chunks runs as two, so
        that decodes always take the compiled step (or graphs) and prefills the eager model:
        the two round differently, and which one a decode took would depend on its neighbours."""
        self.model = model
        self.weights = weights
        self.kv_cache = kv_cache
        self.device = device
        if decode_in_place is None:
            decode_in_place = device.type == "cpu" and kv_cache.keys[0].dtype in IN_PLACE_DECODE_DTYPES
        self.decode_in_place = decode_in_place
        self.layout = StepLayout(kv_cache, device, decode_in_place)
        self.parallel = parallel
        #: The ranks this node spawned (rank 0 under tensor parallelism), stopped by :meth:`close`.
        self.ranks: RankProcesses | None = None
        static_decodes = getattr(model, "compiled_decodes", True)  # CausalLM.compiled_decodes
        compile_decodes = compile_decodes and decode_in_place and not parallel.is_parallel and static_decodes
        self.decode_step = CompiledDecodeStep(model) if compile_decodes else None
        self.decode_graphs = None if parallel.is_parallel or not static_decodes else decode_graphs
        self.batch_invariant = batch_invariant

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], sample_rows: list[int],
            fresh_blocks: list[int] = ()) -> tuple[torch.Tensor, dict[int, list[TokenLogprob]]]:
        """Compute the scheduled tokens; return float32 logits ``[len(sample_rows), vocab]``
        and, for the sequences that want their prompt's logprobs, those of the prompt
        tokens this chunk predicts (by index into ``scheduled``).

        ``sample_rows`` are indices into ``scheduled`` of the sequences whose
        next token is sampled this step (those whose chunk ends their tokens);
        ``fresh_blocks`` were just handed out for the first time and are cleared first.
        """
        if self.parallel.failure is not None:  # the other ranks are gone or stuck: send them nothing
            raise RuntimeError(f"Tensor parallelism failed: {self.parallel.failure}")
        if self.batch_invariant and self._decodes_step_apart():
            num_decodes = num_leading_decodes(scheduled)
            if 0 < num_decodes < len(scheduled):
                return self._run_apart(scheduled, sample_rows, fresh_blocks, num_decodes)
        if self.decode_graphs is not None and self._decodes_only_sampled(scheduled, sample_rows):
            logits = self._run_graphed(scheduled, fresh_blocks)
            if logits is not None:
                return logits, {}
        input_ids, positions, metadata, last_rows = self.prepare(scheduled)
        slices = self._prompt_logprob_slices(scheduled, last_rows)
        plan = StepPlan(tuple(fresh_blocks), input_ids, positions, metadata,
                        compiled=self._compiled_step_fits(scheduled, sample_rows, metadata),
                        sample_rows=self.layout.tensor(np.asarray([last_rows[i] for i in sample_rows], dtype=np.int64)),
                        prompt_rows=tuple(rows for rows, _ in slices))
        prompt_logprobs: dict[int, list[TokenLogprob]] = {}

        def score_prompt(j: int, logits: torch.Tensor) -> None:
            index, targets, top_k = slices[j][1]
            logprobs = torch.log_softmax(logits, -1)
            prompt_logprobs.setdefault(index, []).extend(logprob_records(logprobs, targets, [top_k] * len(targets)))

        if not self.parallel.is_parallel:
            return self.execute(plan, score_prompt), prompt_logprobs
        self._send(plan)
        try:
            return self.execute(plan, score_prompt), prompt_logprobs
        except Exception as exc:  # every rank computes the same step: a failure is the group's
            exited = self.ranks.exit_within(1.0) if self.ranks is not None else None
            self.parallel.fail(exited or f"a step failed: {type(exc).__name__}: {exc}")
            raise

    def _decodes_step_apart(self) -> bool:
        """Whether steps of decodes only take another path than mixed steps (compiled or graphed)."""
        return self.decode_step is not None or self.decode_graphs is not None

    def _run_apart(self, scheduled: list[tuple[Sequence, int]], sample_rows: list[int], fresh_blocks: list[int],
                   num_decodes: int) -> tuple[torch.Tensor, dict[int, list[TokenLogprob]]]:
        """:meth:`run` of a mixed step as a step of its decodes, then one of its prefill chunks."""
        decode_logits, decode_logprobs = self.run(scheduled[:num_decodes], [i for i in sample_rows if i < num_decodes],
                                                  fresh_blocks)
        prefill_logits, prefill_logprobs = self.run(scheduled[num_decodes:],
                                                    [i - num_decodes for i in sample_rows if i >= num_decodes])
        prompt_logprobs = decode_logprobs | {i + num_decodes: records for i, records in prefill_logprobs.items()}
        return torch.cat([decode_logits, prefill_logits]), prompt_logprobs

    def capture_decode_graphs(self) -> None:
        """Capture the decode graphs (the engine's warm-up). Where the compiled step fails,
        capture the model op by op; where the device refuses, log why and run every step eagerly."""
        graphs = self.decode_graphs
        if graphs is None:
            return
        start = time.perf_counter()
        try:
            graphs.capture_all()
        except Exception:
            if isinstance(graphs.step, CompiledDecodeStep):
                logger.exception("Capturing the compiled decode step failed; capturing the model op by op.")
                graphs.graphs.clear()
                graphs.step = graphs.eager_step()
                return self.capture_decode_graphs()
            logger.exception("Capturing the decode graphs failed; running every step eagerly.")
            self.decode_graphs = None
            return
        logger.info("Decode graphs: %d captured (%s) in %.1f s.", len(graphs.graphs),
                    "compiled" if isinstance(graphs.step, CompiledDecodeStep) else "op by op",
                    time.perf_counter() - start)

    def close(self) -> None:
        """Tell the other ranks to stop, and wait for this node's to end."""
        if self.parallel.is_parallel and self.parallel.failure is None:
            try:
                self.parallel.send_plan(None)
            except Exception:
                logger.warning("Could not tell the other ranks to stop.", exc_info=True)
        if self.ranks is not None and self.parallel.failure is None:
            self.ranks.stop()
        elif self.ranks is not None:  # ranks of a failed group may be stuck: give them a moment only
            self.ranks.stop(timeout_s=1.0)
        if self.parallel.is_parallel:
            self.parallel.leave()

    def execute(self, plan: StepPlan,
                score_prompt: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Compute a step: float32 logits of its sampled rows; ``score_prompt(j, logits)``
        gets the float32 logits of each of ``plan.prompt_rows`` in turn (rank 0's)."""
        self.kv_cache.clear_blocks(list(plan.fresh_blocks))
        if plan.compiled and self.decode_step is not None:
            logits = self._run_compiled(plan.input_ids, plan.positions, plan.metadata)
            if logits is not None:
                return logits
        hidden = self.model(plan.input_ids, plan.positions, self.kv_cache, plan.metadata)
        logits = self.model.compute_logits(hidden.index_select(0, plan.sample_rows)).float()
        for j, (first, last) in enumerate(plan.prompt_rows):
            prompt_logits = self.model.compute_logits(hidden[first:last]).float()
            if score_prompt is not None:
                score_prompt(j, prompt_logits)
        return logits

    def _send(self, plan: StepPlan) -> None:
        """Rank 0: hand the plan to the other ranks (as CPU tensors; each moves them to its device)."""
        try:
            self.parallel.send_plan(plan if self.device.type == "cpu" else move_to(plan, torch.device("cpu")))
        except Exception as exc:
            self.parallel.fail(f"sending a step to the other ranks failed: {exc}")
            raise

    @staticmethod
    def _decodes_only_sampled(scheduled: list[tuple[Sequence, int]], sample_rows: list[int]) -> bool:
        """Whether a step is what the compiled step and the decode graphs compute: one token
        per sequence, every row sampled (the logits' rows are the scheduled sequences'), no
        prompt logprobs wanted (one-token chunks of a prompt can come in steps like this)."""
        return (len(sample_rows) == len(scheduled) and all(n == 1 for _, n in scheduled)
                and not any(seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens
                            for seq, _ in scheduled))

    def _compiled_step_fits(self, scheduled: list[tuple[Sequence, int]], sample_rows: list[int],
                            metadata: PagedAttentionMetadata | DecodeTables) -> bool:
        return (self.decode_step is not None and isinstance(metadata, DecodeTables)
                and self._decodes_only_sampled(scheduled, sample_rows))

    def _run_graphed(self, scheduled: list[tuple[Sequence, int]], fresh_blocks: list[int]) -> torch.Tensor | None:
        """A step of decodes through the decode graphs: its float32 logits; None when it is
        larger than their largest batch or longest context, or when they failed (a capture
        the device refused: no graphs from then on)."""
        ids, positions, _ = token_layout(scheduled)
        shape = self.decode_graphs.shape_for(len(scheduled), int(positions.max()) + 1)
        if shape is None:
            return None
        self.kv_cache.clear_blocks(list(fresh_blocks))
        try:
            return self.decode_graphs.run(shape, ids, positions, self.layout.slots(scheduled, positions),
                                          [seq.block_table for seq, _ in scheduled])
        except Exception:  # the step is redone eagerly (its cache writes are the same), so nothing is lost
            logger.exception("A decode graph failed; running every step eagerly from now on.")
            self.decode_graphs = None
            return None

    def _run_compiled(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      metadata: DecodeTables) -> torch.Tensor | None:
        """The compiled step's logits; None, and eager steps from now on, if it failed
        (no C++ compiler, a compile error, a graph it may not build at serve time)."""
        try:
            return self.decode_step(input_ids, positions, self.kv_cache, metadata)
        except Exception:  # the step is redone eagerly, so nothing is lost
            logger.exception("The compiled decode step failed; running every step eagerly from now on.")
            self.decode_step = None
            return None

    def _prompt_logprob_slices(self, scheduled: list[tuple[Sequence, int]], last_rows: list[int]
                               ) -> list[tuple[tuple[int, int], PromptLogprobSlice]]:
        """For the sequences that want their prompt's logprobs: the rows of this chunk that
        predict prompt tokens (the row at position p predicts token p + 1), a slice of
        rows at a time (a full-vocabulary row is large), with the tokens they predict."""
        slices = []
        for i, (seq, n) in enumerate(scheduled):
            if seq.prompt_logprobs is None or seq.num_computed_tokens >= seq.num_prompt_tokens:
                continue
            first_row = last_rows[i] - n + 1
            start = seq.num_computed_tokens
            end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt row samples
            for first in range(start, end, PROMPT_LOGPROBS_ROWS):
                last = min(first + PROMPT_LOGPROBS_ROWS, end)
                rows = (first_row + first - start, first_row + last - start)
                slices.append((rows, PromptLogprobSlice(i, seq.token_ids[first + 1 : last + 1],
                                                        seq.sampling_params.prompt_logprobs)))
        return slices

    def prepare(self, scheduled: list[tuple[Sequence, int]]):
        """``(input_ids, positions, metadata, last_rows)`` for a step
        (:meth:`StepLayout.prepare <lmserve.backends.torch.step_layout.StepLayout.prepare>`)."""
        return self.layout.prepare(scheduled)
