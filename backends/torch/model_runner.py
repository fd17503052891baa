"""Turns a scheduled step into tensors, runs the model, returns the logits to sample.

The step's tokens are laid out ``[decodes | prefill chunk 1 | chunk 2 | ...]``.
Slot arithmetic (block tables -> cache rows) is done here once per step with
numpy, so the layers only index.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from lmserve.backends.torch.attention import (
    IN_PLACE_DECODE_DTYPES,
    InPlaceDecodes,
    MAX_GROUPED_SCORES,
    PagedAttentionMetadata,
    PrefillSegment,
)
from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.sampler import logprob_records
from lmserve.backends.torch.sequence import Sequence
from lmserve.core.types import TokenLogprob

logger = logging.getLogger(__name__)

#: Prompt rows turned into full-vocabulary logprobs at a time (256 x 49,152 floats: 50 MB).
PROMPT_LOGPROBS_ROWS = 256


class DecodeFields(NamedTuple):
    """The decode fields of :class:`PagedAttentionMetadata`, whichever path the decodes take
    (the defaults: no decodes, or the fields of the other path)."""

    gather_blocks: torch.Tensor | None = None
    max_context: int = 0
    bias: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, device: torch.device,
                 sliding_window: int | None = None, decode_in_place: bool | None = None,
                 weights: str = "", compile_decodes: bool = False):
        """``decode_in_place``: decodes attend by reading the cache in place (a
        Numba kernel) rather than gathering their contexts; default: on the CPU,
        for float32 and bfloat16 caches. ``weights`` says what the weights are
        (dtype, quantization and why), for the start-up line. ``compile_decodes``:
        steps of decodes only run as one compiled graph
        (:class:`~lmserve.backends.torch.compiled_step.CompiledDecodeStep`; needs ``decode_in_place``)."""
        self.model = model
        self.weights = weights
        self.kv_cache = kv_cache
        self.device = device
        self.sliding_window = sliding_window
        if decode_in_place is None:
            decode_in_place = device.type == "cpu" and kv_cache.keys[0].dtype in IN_PLACE_DECODE_DTYPES
        self.decode_in_place = decode_in_place
        self.decode_step = CompiledDecodeStep(model) if compile_decodes and decode_in_place else None
        self._head_offsets = np.arange(kv_cache.num_kv_heads, dtype=np.int64) * kv_cache.num_slots
        self._head_offsets_in_blocks = np.arange(kv_cache.num_kv_heads, dtype=np.int64) * (kv_cache.num_blocks + 1)

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
        self.kv_cache.clear_blocks(fresh_blocks)
        input_ids, positions, metadata, last_rows = self.prepare(scheduled)
        if self._compiled_step_fits(scheduled, sample_rows, metadata):
            logits = self._run_compiled(input_ids, positions, metadata)
            if logits is not None:
                return logits, {}
        hidden = self.model(input_ids, positions, self.kv_cache, metadata)
        rows = torch.as_tensor([last_rows[i] for i in sample_rows], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
        prompt_logprobs = {
            i: self._prompt_logprobs(seq, hidden[last_rows[i] - n + 1 : last_rows[i] + 1])
            for i, (seq, n) in enumerate(scheduled)
            if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens
        }
        return logits, prompt_logprobs

    def _compiled_step_fits(self, scheduled: list[tuple[Sequence, int]], sample_rows: list[int],
                            metadata: PagedAttentionMetadata | InPlaceDecodes) -> bool:
        """Whether the compiled step computes this one: one token per sequence, every row
        sampled (its logits' rows are the scheduled sequences'), no prompt logprobs wanted
        (one-token chunks of a prompt can come in steps like this)."""
        return (self.decode_step is not None and isinstance(metadata, InPlaceDecodes)
                and len(sample_rows) == len(scheduled)
                and not any(seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens
                            for seq, _ in scheduled))

    def _run_compiled(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      metadata: InPlaceDecodes) -> torch.Tensor | None:
        """The compiled step's logits; None, and eager steps from now on, if it failed
        (no C++ compiler, a compile error, a graph it may not build at serve time)."""
        try:
            return self.decode_step(input_ids, positions, self.kv_cache, metadata)
        except Exception:  # the step is redone eagerly, so nothing is lost
            logger.exception("The compiled decode step failed; running every step eagerly from now on.")
            self.decode_step = None
            return None

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[TokenLogprob]:
        """Logprobs of the prompt tokens that this chunk's rows predict (the row at
        position p predicts token p + 1), a slice of rows at a time (a full-vocabulary
        row is large)."""
        k = seq.sampling_params.prompt_logprobs
        start = seq.num_computed_tokens
        end = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)  # the last prompt row samples
        records: list[TokenLogprob] = []
        for first in range(start, end, PROMPT_LOGPROBS_ROWS):
            last = min(first + PROMPT_LOGPROBS_ROWS, end)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[first - start : last - start]).float(), -1)
            targets = seq.token_ids[first + 1 : last + 1]
            records.extend(logprob_records(logprobs, targets, [k] * len(targets)))
        return records

    def prepare(self, scheduled: list[tuple[Sequence, int]]):
        """``(input_ids, positions, metadata, last_rows)`` for a step; ``last_rows[i]``
        is the row of the last token of ``scheduled[i]``."""
        num_decodes = _num_leading_decodes(scheduled)
        ids, positions, last_rows = _token_layout(scheduled)
        context_lens = positions[:num_decodes] + 1
        write_rows = self._tensor(self._write_rows(scheduled, positions))
        if num_decodes == len(scheduled) and self.decode_in_place:
            tables = self._decode_block_tables(scheduled, context_lens)
            metadata = InPlaceDecodes(write_rows, torch.from_numpy(tables), torch.from_numpy(context_lens),
                                      self.sliding_window or 0)
            return self._tensor(ids), self._tensor(positions), metadata, last_rows
        decodes = self._decode_fields(scheduled[:num_decodes], context_lens)
        metadata = PagedAttentionMetadata(
            write_rows=write_rows,
            num_decodes=num_decodes,
            decode_gather_blocks=decodes.gather_blocks,
            decode_max_context=decodes.max_context,
            decode_bias=decodes.bias,
            prefills=self._prefill_segments(scheduled[num_decodes:], first_row=num_decodes),
            decode_block_tables=decodes.block_tables,
            decode_context_lens=decodes.context_lens,
            sliding_window=self.sliding_window or 0,
        )
        return self._tensor(ids), self._tensor(positions), metadata, last_rows

    def _write_rows(self, scheduled: list[tuple[Sequence, int]], positions: np.ndarray) -> np.ndarray:
        """``[kv_heads * T]`` rows of the flat cache where the step's new keys/values go:
        each token's slot, from its sequence's block table, for every kv head."""
        block_size = self.kv_cache.block_size
        block_ids = np.empty(len(positions), dtype=np.int64)
        row = 0
        for seq, n in scheduled:
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_ids[row : row + n] = table[positions[row : row + n] // block_size]
            row += n
        slots = block_ids * block_size + positions % block_size
        return (self._head_offsets[:, None] + slots[None, :]).reshape(-1)

    def _decode_fields(self, decodes: list[tuple[Sequence, int]], context_lens: np.ndarray) -> DecodeFields:
        """How the decodes find their contexts: their block tables, read in place,
        or the blocks to gather and a bias over the padded context."""
        if not decodes:
            return DecodeFields()
        tables = self._decode_block_tables(decodes, context_lens)
        if self.decode_in_place:
            return DecodeFields(block_tables=torch.from_numpy(tables), context_lens=torch.from_numpy(context_lens))
        max_context = tables.shape[1] * self.kv_cache.block_size
        token_index = np.arange(max_context)
        mask = token_index[None, :] < context_lens[:, None]
        if self.sliding_window is not None:
            mask &= token_index[None, :] > (context_lens[:, None] - 1 - self.sliding_window)
        bias = np.where(mask, np.float32(0), np.float32(-np.inf))
        return DecodeFields(gather_blocks=self._tensor(self._head_blocks(tables).reshape(-1)),
                            max_context=max_context,
                            bias=torch.from_numpy(bias[:, None, None, :]).to(self.device))

    def _decode_block_tables(self, decodes: list[tuple[Sequence, int]],
                             context_lens: np.ndarray) -> np.ndarray:
        """``[num_decodes, max_blocks]`` block tables, padded with the null block; read in
        place, at least two columns (the compiled step would compile a graph of its own for one)."""
        max_blocks = -(-int(context_lens.max()) // self.kv_cache.block_size)
        if self.decode_in_place:
            max_blocks = max(2, max_blocks)
        tables = np.full((len(decodes), max_blocks), self.kv_cache.null_block, dtype=np.int64)
        for i, (seq, _) in enumerate(decodes):
            table = seq.block_table[:max_blocks]
            tables[i, : len(table)] = table
        return tables

    def _prefill_segments(self, chunks: list[tuple[Sequence, int]],
                          first_row: int) -> tuple[PrefillSegment, ...]:
        """One segment per prefill chunk; the chunks' tokens follow one another from ``first_row``."""
        segments = []
        row = first_row
        for seq, n in chunks:
            segments.append(self._prefill_segment(seq, n, row))
            row += n
        return tuple(segments)

    def _prefill_segment(self, seq: Sequence, n: int, row: int) -> PrefillSegment:
        """The ``n`` tokens of ``seq``'s chunk (at ``row``): the cached context to gather
        (if any) and how its queries are masked."""
        start = seq.num_computed_tokens
        context_len = start + n
        gather_blocks = mask = bias = None
        if start > 0:
            table = np.asarray(seq.block_table[: -(-context_len // self.kv_cache.block_size)], dtype=np.int64)
            gather_blocks = self._tensor(self._head_blocks(table[None, :]).reshape(-1))
        # Short chunks attend with grouped_attention on the CPU (measured faster there).
        small = self.device.type == "cpu" and n * context_len <= MAX_GROUPED_SCORES
        if small or start > 0 or self.sliding_window is not None:
            allowed = self._prefill_allowed(start, context_len)
            if small:
                bias = self._tensor(np.where(allowed, np.float32(0), np.float32(-np.inf)))
            else:
                mask = torch.from_numpy(allowed).to(self.device)
        return PrefillSegment(row, n, context_len, gather_blocks, mask, bias)

    def _prefill_allowed(self, start: int, context_len: int) -> np.ndarray:
        """``[context_len - start, context_len]`` bool: True where the query at position
        ``start + i`` may attend the key at position ``j`` (causal, within the window)."""
        query_pos = np.arange(start, context_len)[:, None]
        key_pos = np.arange(context_len)[None, :]
        allowed = key_pos <= query_pos
        if self.sliding_window is not None:
            allowed &= key_pos > query_pos - self.sliding_window
        return allowed

    def _head_blocks(self, tables: np.ndarray) -> np.ndarray:
        """``[N, blocks]`` block ids -> ``[N, kv_heads, blocks]`` rows of the cache's block view."""
        return self._head_offsets_in_blocks[None, :, None] + tables[:, None, :]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


def _num_leading_decodes(scheduled: list[tuple[Sequence, int]]) -> int:
    """The leading one-token chunks: they attend as one batch of decodes."""
    num_decodes = 0
    for _, n in scheduled:
        if n != 1:
            break
        num_decodes += 1
    return num_decodes


def _token_layout(scheduled: list[tuple[Sequence, int]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The step's token ids and positions (int64 ``[T]``), chunk after chunk, and the
    row of each chunk's last token."""
    ids: list[int] = []
    positions: list[int] = []
    last_rows: list[int] = []
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        ids.extend(seq.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        last_rows.append(len(ids) - 1)
    return np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), last_rows
