"""The engine's sampler: one batched Numba kernel call per step.

Randomness is counter-based: the draw for a request's n-th output token is a
function of (its seed, n) only, so a seeded request gives the same tokens
alone, in any batch, and after preemption. CPU logits go to the ``@njit``
kernel, CUDA logits to the ``@cuda.jit`` twin.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from lmserve.backends.torch.kernels.sampling import SamplingBatch, SamplingWorkspace, sample_cpu, sample_cuda
from lmserve.backends.torch.sequence import Sequence


class Sampler:
    def __init__(self) -> None:
        self._workspace = SamplingWorkspace()

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        """``logits``: float32 ``[len(seqs), vocab]`` (overwritten). Returns one token id per sequence."""
        # Token histories are only copied for rows with penalties.
        batch = SamplingBatch.from_requests(
            [seq.sampling_params for seq in seqs],
            [seq.output_token_ids for seq in seqs],
            [seq.request.prompt_token_ids for seq in seqs],
            seeds=[seq.seed for seq in seqs],
        )
        logits = logits.contiguous()
        if logits.is_cuda:
            tokens, _ = sample_cuda(logits, batch, self._workspace)
        else:
            tokens, _ = sample_cpu(logits, batch, self._workspace)
        return tokens.tolist()

