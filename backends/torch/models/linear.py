"""The projections and the embedding every family builds its layers from.

Each is a plain ``nn.Linear`` (or ``nn.Embedding``) whole on one device; under
tensor parallelism a layer holds only its part of the weight, and its ``shard``
tells the weight loader which part of each full tensor that is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.backends.torch.tensor_parallel import TensorParallel, WeightSlice


def make_linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Linear:
    """Every projection of a model is built here or by the two functions below."""
    return nn.Linear(in_features, out_features, bias=bias)


def column_parallel_linear(in_features: int, rows: tuple[int, int], *, bias: bool = False) -> nn.Linear:
    """The ``(start, length)`` output rows of a projection (this rank's heads or MLP part)."""
    start, length = rows
    linear = make_linear(in_features, length, bias=bias)
    linear.shard = {"weight": WeightSlice(0, start, length), "bias": WeightSlice(0, start, length)}
    return linear


def row_parallel_linear(columns: tuple[int, int], out_features: int, *, bias: bool, rank: int) -> nn.Linear:
    """The ``(start, length)`` input columns of a projection whose output the ranks add up
    (one all-reduce, by the caller); the bias is added once, by rank 0."""
    start, length = columns
    linear = make_linear(length, out_features, bias=bias)
    linear.shard = {"weight": WeightSlice(1, start, length), "bias": WeightSlice(0, 0, 0 if rank else out_features)}
    return linear


def fuse_linear(*layers: nn.Linear) -> nn.Linear:
    """One column-parallel layer whose output is the layers' outputs side by side.

    (Under tensor parallelism each part is sharded on its own, then fused per rank.)
    """
    first = layers[0]
    fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers),
                      bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's slice of the vocabulary (padded so that every
    rank's slice has the same length); other tokens look up zeros, and the ranks' rows
    are added up."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: TensorParallel):
        self.start, length = parallel.padded_split(vocab_size)
        super().__init__(length, hidden_size)
        self.parallel = parallel
        self.shard = {"weight": WeightSlice(0, self.start, length)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(torch.where(inside, local, 0), self.weight) * inside[:, None].to(self.weight.dtype)
        return self.parallel.all_reduce(rows)


def make_embedding(vocab_size: int, hidden_size: int, parallel: TensorParallel) -> nn.Embedding:
    """The token embedding: whole, or this rank's slice of the vocabulary."""
    if parallel.is_parallel:
        return VocabParallelEmbedding(vocab_size, hidden_size, parallel)
    return nn.Embedding(vocab_size, hidden_size)
