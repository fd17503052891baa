"""Lays a scheduled step out as tensors: token ids, positions and the attention metadata.

The step's tokens are laid out ``[decodes | prefill chunk 1 | chunk 2 | ...]``.
Slot arithmetic (block tables -> cache rows) is done here once per step with
numpy, so the layers only index. :class:`StepLayout` knows the cache's shape and
the device, nothing of the model: the model runner
(:mod:`~lmserve.backends.torch.model_runner`) asks it for a step's tensors and
executes them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch

from lmserve.backends.torch.attention import MAX_GROUPED_SCORES, DecodeTables, PagedAttentionMetadata, PrefillSegment
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.sequence import Sequence


class DecodeFields(NamedTuple):
    """The decode fields of :class:`PagedAttentionMetadata`, whichever path the decodes take
    (the defaults: no decodes, or the fields of the other path)."""

    gather_blocks: torch.Tensor | None = None
    max_context: int = 0
    bias: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None


class StepLayout:
    """A step's tokens, positions and attention metadata, laid out for one rank's cache."""

    def __init__(self, kv_cache: PagedKVCache, device: torch.device, decode_in_place: bool):
        """``decode_in_place``: decodes read the cache in place (block tables) rather than
        gather their contexts (blocks to gather and a bias over the padded context)."""
        self.kv_cache = kv_cache
        self.device = device
        self.decode_in_place = decode_in_place
        windows = {layer.window for layer in kv_cache.layers}
        if len(windows - {0}) > 1:
            raise ValueError(f"the sliding layers of a model must share one window, got {sorted(windows - {0})}")
        #: The sliding layers' window (None: no layer slides); whether other layers attend fully.
        self.sliding_window = max(windows) or None
        self.mixed_windows = len(windows) > 1
        self._head_offsets = np.arange(kv_cache.num_kv_heads, dtype=np.int64) * kv_cache.num_slots
        self._head_offsets_in_blocks = np.arange(kv_cache.num_kv_heads, dtype=np.int64) * (kv_cache.num_blocks + 1)

    def prepare(self, scheduled: list[tuple[Sequence, int]]):
        """``(input_ids, positions, metadata, last_rows)`` for a step; ``last_rows[i]``
        is the row of the last token of ``scheduled[i]``. A step of decodes only that
        reads the cache in place gets the tensor-only :class:`DecodeTables`."""
        num_decodes = num_leading_decodes(scheduled)
        ids, positions, last_rows = token_layout(scheduled)
        context_lens = positions[:num_decodes] + 1
        write_rows = self.tensor(self._write_rows(scheduled, positions))
        if num_decodes == len(scheduled) and self.decode_in_place:
            tables = self._decode_block_tables(scheduled, context_lens)
            metadata = DecodeTables(write_rows, torch.from_numpy(tables), torch.from_numpy(context_lens))
            return self.tensor(ids), self.tensor(positions), metadata, last_rows
        if self.mixed_windows:
            metadata = self._paged_metadata(scheduled, num_decodes, write_rows, context_lens, None)
            sliding = self._paged_metadata(scheduled, num_decodes, write_rows, context_lens, self.sliding_window)
            metadata = dataclasses.replace(metadata, sliding=sliding)
        else:
            metadata = self._paged_metadata(scheduled, num_decodes, write_rows, context_lens, self.sliding_window)
        return self.tensor(ids), self.tensor(positions), metadata, last_rows

    def slots(self, scheduled: list[tuple[Sequence, int]], positions: np.ndarray) -> np.ndarray:
        """``[T]``: the cache slot of each of the step's tokens, from its sequence's block table."""
        block_size = self.kv_cache.block_size
        block_ids = np.empty(len(positions), dtype=np.int64)
        row = 0
        for seq, n in scheduled:
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_ids[row : row + n] = table[positions[row : row + n] // block_size]
            row += n
        return block_ids * block_size + positions % block_size

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the device (copied to a contiguous buffer first if it is a view)."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _paged_metadata(self, scheduled: list[tuple[Sequence, int]], num_decodes: int, write_rows: torch.Tensor,
                        context_lens: np.ndarray, window: int | None) -> PagedAttentionMetadata:
        """A mixed step's metadata, its masks cut to ``window`` (None: every position)."""
        decodes = self._decode_fields(scheduled[:num_decodes], context_lens, window)
        return PagedAttentionMetadata(
            write_rows=write_rows,
            num_decodes=num_decodes,
            decode_gather_blocks=decodes.gather_blocks,
            decode_max_context=decodes.max_context,
            decode_bias=decodes.bias,
            prefills=self._prefill_segments(scheduled[num_decodes:], num_decodes, window),
            decode_block_tables=decodes.block_tables,
            decode_context_lens=decodes.context_lens,
        )

    def _write_rows(self, scheduled: list[tuple[Sequence, int]], positions: np.ndarray) -> np.ndarray:
        """``[kv_heads * T]`` rows of the flat cache where the step's new keys/values go:
        each token's slot, for every kv head."""
        slots = self.slots(scheduled, positions)
        return (self._head_offsets[:, None] + slots[None, :]).reshape(-1)

    def _decode_fields(self, decodes: list[tuple[Sequence, int]], context_lens: np.ndarray,
                       window: int | None) -> DecodeFields:
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
        if window is not None:
            mask &= token_index[None, :] > (context_lens[:, None] - 1 - window)
        bias = np.where(mask, np.float32(0), np.float32(-np.inf))
        return DecodeFields(gather_blocks=self.tensor(self._head_blocks(tables).reshape(-1)),
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

    def _prefill_segments(self, chunks: list[tuple[Sequence, int]], first_row: int,
                          window: int | None) -> tuple[PrefillSegment, ...]:
        """One segment per prefill chunk; the chunks' tokens follow one another from ``first_row``."""
        segments = []
        row = first_row
        for seq, n in chunks:
            segments.append(self._prefill_segment(seq, n, row, window))
            row += n
        return tuple(segments)

    def _prefill_segment(self, seq: Sequence, n: int, row: int, window: int | None) -> PrefillSegment:
        """The ``n`` tokens of ``seq``'s chunk (at ``row``): the cached context to gather
        (if any) and how its queries are masked."""
        start = seq.num_computed_tokens
        context_len = start + n
        gather_blocks = mask = bias = None
        if start > 0:
            table = np.asarray(seq.block_table[: -(-context_len // self.kv_cache.block_size)], dtype=np.int64)
            gather_blocks = self.tensor(self._head_blocks(table[None, :]).reshape(-1))
        # Short chunks attend with grouped_attention on the CPU (measured faster there).
        small = self.device.type == "cpu" and n * context_len <= MAX_GROUPED_SCORES
        if small or start > 0 or window is not None:
            allowed = _prefill_allowed(start, context_len, window)
            if small:
                bias = self.tensor(np.where(allowed, np.float32(0), np.float32(-np.inf)))
            else:
                mask = torch.from_numpy(allowed).to(self.device)
        return PrefillSegment(row, n, context_len, gather_blocks, mask, bias)

    def _head_blocks(self, tables: np.ndarray) -> np.ndarray:
        """``[N, blocks]`` block ids -> ``[N, kv_heads, blocks]`` rows of the cache's block view."""
        return self._head_offsets_in_blocks[None, :, None] + tables[:, None, :]


def _prefill_allowed(start: int, context_len: int, window: int | None) -> np.ndarray:
    """``[context_len - start, context_len]`` bool: True where the query at position
    ``start + i`` may attend the key at position ``j`` (causal, within ``window`` if any)."""
    query_pos = np.arange(start, context_len)[:, None]
    key_pos = np.arange(context_len)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


def num_leading_decodes(scheduled: list[tuple[Sequence, int]]) -> int:
    """The leading one-token chunks: they attend as one batch of decodes."""
    num_decodes = 0
    for _, n in scheduled:
        if n != 1:
            break
        num_decodes += 1
    return num_decodes


def token_layout(scheduled: list[tuple[Sequence, int]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
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
