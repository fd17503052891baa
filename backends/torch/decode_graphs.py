"""Steps of decodes replayed as CUDA graphs: the GPU's default (``--enforce-eager`` turns it off).

On a GPU a decode step of a small model is bound by the host: 30 layers of small
kernels, each launched from Python, take far longer to launch than to run. A CUDA
graph records a whole step (every layer's forward and the output projection) once
and replays it with one launch. A graph fixes its shapes and the addresses it reads,
so a step is fitted to one:

- **Batch buckets** (:func:`batch_buckets`): a step of ``n`` decodes runs in the
  smallest bucket of at least ``n`` rows. Padding rows read token 0 at position 0,
  write their keys/values into the null block and attend to its first position
  (context length 1); their logits are dropped.
- **Table widths** (:func:`table_widths`): block tables are padded with the null
  block to a power of two of columns, so one graph serves every context up to that
  many blocks. The attention gathers every column
  (:func:`~lmserve.backends.torch.attention.gathered_decode_attention`) and masks on
  the device with the context lengths, so no per-step value is a Python number.
- **Persistent inputs** (:class:`DecodeInputs`): token ids, positions, cache slots,
  context lengths and block tables live in one int64 host buffer (pinned on CUDA)
  filled with numpy, and its device twin, refreshed by one non-blocking copy per step;
  every graph reads views of the twin at fixed addresses.

The engine's warm-up captures a graph per (bucket, width), largest first, all in one
memory pool (after one eager run of each shape, which pays the lazy initialisations
outside the capture), and every graph writes its logits into one shared buffer. Shapes
that would gather more than ``max_gathered_tokens`` cache positions get no graph (the
memory a graph's attention holds stays in the pool). Prefill and mixed steps, steps
wanting prompt logprobs and steps beyond the largest bucket, width or gathered size run
eagerly. On other devices the same fitted steps run without capture: that is how the
CPU tests check the bucketing, padding and buffers.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from lmserve.backends.torch.attention import DecodeTables
from lmserve.backends.torch.compiled_step import step_logits
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.paged_cache import PagedKVCache


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of 8 up to
    64 and of 16 beyond, and the largest batch (a step pads fewer than 8 rows up to 64
    decodes, fewer than 16 beyond)."""
    sizes = [size for size in (1, 2, 4) if size < max_batch_size]
    sizes += range(8, min(64, max_batch_size) + 1, 8)
    sizes += range(80, max_batch_size + 1, 16)
    if not sizes or sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return tuple(sizes)


def table_widths(max_blocks: int) -> tuple[int, ...]:
    """The block-table widths graphs are captured for: powers of two from 2, and ``max_blocks``."""
    widths = []
    width = 2
    while width < max_blocks:
        widths.append(width)
        width *= 2
    widths.append(max(2, max_blocks))
    return tuple(widths)


def smallest_fitting(sizes: tuple[int, ...], needed: int) -> int | None:
    """The smallest of the sorted ``sizes`` that is at least ``needed``; None if none is."""
    index = bisect.bisect_left(sizes, needed)
    return sizes[index] if index < len(sizes) else None


class DecodeViews(NamedTuple):
    """One step's inputs as views of the device buffer (fixed addresses for a given shape)."""

    input_ids: torch.Tensor  # [batch]
    positions: torch.Tensor  # [batch]
    slots: torch.Tensor  # [batch]: the cache slot each row's key/value goes to
    context_lens: torch.Tensor  # [batch]
    block_tables: torch.Tensor  # [batch, width]


class DecodeInputs:
    """Every graphed step's inputs, in one int64 buffer on the host and its twin on the device.

    Layout: ``[ids | positions | slots | context lengths]``, ``max_batch`` each, then the
    block tables, ``batch x width`` of them laid out for the step's own shape. A step
    fills the host buffer with numpy and copies what it filled in one non-blocking copy.
    """

    def __init__(self, max_batch: int, max_width: int, null_block: int, block_size: int,
                 device: torch.device):
        self.max_batch = max_batch
        self.null_block = null_block
        self.block_size = block_size
        self.device = device
        self._tables_start = 4 * max_batch
        size = max_batch * (4 + max_width)
        pinned = device.type == "cuda"
        self._host_tensor = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
        self.host = self._host_tensor.numpy()
        self.on_device = torch.zeros(size, dtype=torch.int64, device=device)
        #: Set after each copy: the host buffer is not refilled before the copy is done.
        self._copied = torch.cuda.Event() if pinned else None

    def _column(self, index: int) -> slice:
        return slice(index * self.max_batch, (index + 1) * self.max_batch)

    def views(self, batch: int, width: int) -> DecodeViews:
        ids, positions, slots, context_lens = (self.on_device[self._column(i)][:batch] for i in range(4))
        tables = self.on_device[self._tables_start : self._tables_start + batch * width].view(batch, width)
        return DecodeViews(ids, positions, slots, context_lens, tables)

    def fill(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
             block_tables: list[list[int]], batch: int, width: int) -> DecodeViews:
        """Write one step of ``n = len(input_ids)`` decodes, padded to ``batch`` rows and
        ``width`` table columns, and copy it to the device; its views."""
        if self._copied is not None:
            self._copied.synchronize()
        n = len(input_ids)
        host = self.host
        for index, values, padding in ((0, input_ids, 0), (1, positions, 0),
                                       (2, slots, self.null_block * self.block_size),
                                       (3, positions + 1, 1)):
            column = host[self._column(index)]
            column[:n] = values
            column[n:batch] = padding
        end = self._tables_start + batch * width
        tables = host[self._tables_start : end].reshape(batch, width)
        tables.fill(self.null_block)
        for row, table in enumerate(block_tables):
            used = table[:width]
            tables[row, : len(used)] = used
        self.on_device[:end].copy_(self._host_tensor[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))
        return self.views(batch, width)


class DecodeGraphs:
    """``run(...)``: a step of decodes through the graph of its bucket and width.

    ``gather``: the attention's kind (:attr:`DecodeTables.gather`); on CUDA it must be
    True (the Numba kernel reads CPU memory). ``capture``: record CUDA graphs (the
    default on CUDA); without, each step runs its fitted shape eagerly.
    ``max_gathered_tokens``: the largest ``batch x width x block_size`` a graph gathers
    (the memory its attention holds while it runs stays in the graphs' pool for good);
    larger steps run eagerly. ``step``: ``(input_ids, positions, kv_cache, metadata) ->
    float32 logits``, what each graph records: the model op by op (the default) or the
    compiled decode step (:class:`~lmserve.backends.torch.compiled_step.CompiledDecodeStep`,
    fewer and fused kernels)."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, device: torch.device, *,
                 max_batch_size: int, max_blocks: int, gather: bool = True,
                 capture: bool | None = None, max_gathered_tokens: int = 256 * 1024,
                 step: Callable[..., torch.Tensor] | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.buckets = batch_buckets(max_batch_size)
        self.widths = table_widths(max_blocks)
        self.gather = gather
        self.capture = device.type == "cuda" if capture is None else capture
        self.max_gathered_tokens = max_gathered_tokens
        self.step = step or self.eager_step()
        self.inputs = DecodeInputs(self.buckets[-1], self.widths[-1], kv_cache.null_block, kv_cache.block_size,
                                   device)
        self._head_offsets = torch.arange(kv_cache.num_kv_heads, device=device) * kv_cache.num_slots
        #: Every graph writes its logits here (rows past a step's decodes are its padding's).
        self._logits = torch.empty(self.buckets[-1], model.lm_head.out_features, dtype=torch.float32, device=device)
        #: (batch, width) -> the graph captured for that shape.
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if self.capture:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)

    def eager_step(self) -> Callable[..., torch.Tensor]:
        """The model op by op, as a ``step``."""
        return functools.partial(step_logits, self.model)

    def shapes(self) -> list[tuple[int, int]]:
        """Every ``(batch, width)`` a graph may have, largest first."""
        return sorted(((batch, width) for batch in self.buckets for width in self.widths
                       if self._gathers_at_most_the_cap(batch, width)), reverse=True)

    def shape_for(self, num_decodes: int, max_context: int) -> tuple[int, int] | None:
        """``(batch, width)`` of the graph for ``num_decodes`` decodes whose longest context
        is ``max_context`` tokens; None when none fits (the step runs eagerly)."""
        batch = smallest_fitting(self.buckets, num_decodes)
        width = smallest_fitting(self.widths, -(-max_context // self.kv_cache.block_size))
        if batch is None or width is None or not self._gathers_at_most_the_cap(batch, width):
            return None
        return batch, width

    def _gathers_at_most_the_cap(self, batch: int, width: int) -> bool:
        return batch * width * self.kv_cache.block_size <= self.max_gathered_tokens

    def capture_all(self) -> None:
        """Capture a graph for every shape, largest first (the pool grows once), with inputs
        of padding only (which write into the null block): the engine's warm-up does this,
        so no step pays for a capture while serving. Without capture, each shape runs once."""
        for batch, width in self.shapes():
            views = self.inputs.fill(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), [],
                                     batch, width)
            if self.capture:
                self._graph((batch, width), views)
            else:
                self._step(views)

    def run(self, shape: tuple[int, int], input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
            block_tables: list[list[int]]) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` of ``n`` decodes (token ``input_ids[i]`` at
        ``positions[i]``, its key/value into cache slot ``slots[i]``) in the graph of
        ``shape`` (from :meth:`shape_for`). The rows stay valid until the next step."""
        batch, _ = shape
        views = self.inputs.fill(input_ids, positions, slots, block_tables, batch, shape[1])
        if self.capture:
            with torch.cuda.device(self.device):
                self._graph(shape, views).replay()
        else:
            self._logits[:batch].copy_(self._step(views))
        return self._logits[: len(input_ids)]

    def _step(self, views: DecodeViews) -> torch.Tensor:
        """What a graph records: the forward of a fitted step, its float32 logits ``[batch, vocab]``."""
        write_rows = (self._head_offsets[:, None] + views.slots[None, :]).reshape(-1)
        metadata = DecodeTables(write_rows, views.block_tables, views.context_lens, gather=self.gather)
        return self.step(views.input_ids, views.positions, self.kv_cache, metadata)

    def _graph(self, shape: tuple[int, int], views: DecodeViews) -> torch.cuda.CUDAGraph:
        """The graph of ``shape``, captured now if it was not yet (``views``: its inputs).

        One eager run first, on the capture's own stream (its writes to the cache are the
        ones the replay makes again), lets cuBLAS and the attention pick and set up their
        kernels outside the capture. The outer stream context gives this thread its stream
        back even when a capture breaks (``torch.cuda.graph`` may raise before restoring it)."""
        graph = self.graphs.get(shape)
        if graph is not None:
            return graph
        batch, _ = shape
        with torch.cuda.device(self.device), torch.cuda.stream(torch.cuda.current_stream(self.device)):
            torch.cuda.synchronize(self.device)
            with torch.cuda.stream(self._stream):
                self._step(views)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                self._logits[:batch].copy_(self._step(views))
        self.graphs[shape] = graph
        return graph
