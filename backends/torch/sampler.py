"""Batched sampling for the engine (interim torch version; kernels replace it)."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from lmserve.backends.torch.sequence import Sequence


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed for (request seed, output index): the draw for the n-th
    token of a request never depends on the rest of the batch."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    return (x ^ (x >> 29)) & 0x7FFF_FFFF_FFFF_FFFF


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
    out = torch.argmax(logits, dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        if params.greedy:
            continue
        row_logits = logits[row] / params.temperature
        if 0 < params.top_k < row_logits.numel():
            kth = torch.topk(row_logits, params.top_k).values[-1]
            row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(row_logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row_logits = torch.full_like(row_logits, float("-inf")).scatter(0, order, sorted_logits)
        generator = torch.Generator(device=logits.device).manual_seed(_mix(seq.seed, seq.num_output_tokens))
        out[row] = int(torch.multinomial(torch.softmax(row_logits, dim=-1), 1, generator=generator))
    return out
