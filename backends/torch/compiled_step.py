"""The decode step as one compiled graph: the CPU's default (``--enforce-eager`` turns it off),
and what CUDA's decode graphs record (:mod:`~lmserve.backends.torch.decode_graphs`).

Run op by op, a decode step of a small model is mostly overhead: 30 layers of
norms, rotary embeddings, SiLU, casts and cache writes are some 2,000 small
eager calls, each paying Python and dispatch, around matmuls that read the
weights once. ``torch.compile`` (inductor's CPU backend) traces the whole
forward and the output projection into one graph, fuses the elementwise work
into a few generated C++ loops per layer and leaves one Python call per step.

What it cannot trace are lmserve's own operators (:mod:`~lmserve.backends.torch.ops`):
the matmuls on packed or quantized weights and the paged decode attention,
which it calls as they are. Steps of decodes only take this path; prefill and
mixed steps run eagerly (their time is in large matmuls, not in overhead).

On CUDA inductor writes Triton kernels instead, and the decodes' attention
(gathered from block tables, torch ops only) is traced with the rest; each CUDA
graph then replays the compiled step of its shape.

Shapes are dynamic (one graph for any batch size and context), except that
torch specialises a dimension of size 1: a one-sequence step has a graph of
its own, and block tables are padded to two columns so contexts of one block
need none. Both graphs are compiled by the engine's warm-up (about a minute on
two cores; inductor keeps what it built on disk, so the next start is faster).
"""

from __future__ import annotations

import contextlib
import types

import torch

from lmserve.backends.torch.attention import DecodeTables
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.paged_cache import PagedKVCache


def step_logits(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: PagedKVCache, metadata: DecodeTables) -> torch.Tensor:
    """What the compiled step computes: float32 logits of every row."""
    hidden = model.hidden_states(input_ids, positions, kv_cache, metadata)
    return model.logits(hidden).float()


def _own_copy(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a code object of its own. torch.compile keeps its graphs, and
    counts recompilations against a limit, per code object: each engine's step gets
    its own, so several engines in one process (tests) neither share nor exhaust them."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _distinct_sizes() -> contextlib.AbstractContextManager:
    """While tracing, sizes that happen to be equal stay distinct symbols: by default torch
    gives them one ("duck sizing"), and a warm-up batch of two sequences with two-column
    block tables would build a graph only for batches as wide as their tables."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "use_duck_shape"):
        return contextlib.nullcontext()
    return _config.patch(use_duck_shape=False)


class CompiledDecodeStep:
    """``(input_ids, positions, kv_cache, metadata) -> float32 logits`` of every row, compiled."""

    def __init__(self, model: CausalLM):
        self.model = model
        self._compiled = torch.compile(_own_copy(step_logits), dynamic=True, fullgraph=True)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache,
                 metadata: DecodeTables) -> torch.Tensor:
        with _distinct_sizes():
            return self._compiled(self.model, input_ids, positions, kv_cache, metadata)
