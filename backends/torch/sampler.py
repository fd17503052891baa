"""The engine's sampler: one batched Numba kernel call per step.

Randomness is counter-based: the draw for a request's n-th output token is a
function of (its seed, n) only, so a seeded request's draws do not depend on
its batch (its tokens do not either where its logits do not: ``--batch-invariant``).
CPU logits go to the ``@njit``
kernel, CUDA logits to the ``@cuda.jit`` twin.

Rows with a structured-output constraint sample only the tokens it allows: the
constraint writes its bitmask on the host and the kernel applies it first
(:func:`allowed_tokens`).
"""

from __future__ import annotations

import numpy as np
import torch

from lmserve.backends.torch.kernels.sampling import SamplingBatch, SamplingWorkspace, sample_cpu, sample_cuda
from lmserve.backends.torch.sequence import Sequence
from lmserve.core.types import TokenLogprob


class Sampler:
    def __init__(self) -> None:
        self._workspace = SamplingWorkspace()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """``logits``: float32 ``[len(seqs), vocab]`` (overwritten). Returns one token id per sequence."""
        token_bitmask, bitmask_rows = allowed_tokens(seqs, logits.shape[-1])
        # Token histories are only copied for rows with penalties.
        batch = SamplingBatch.from_requests(
            [seq.sampling_params for seq in seqs],
            [seq.output_token_ids for seq in seqs],
            [seq.request.prompt_token_ids for seq in seqs],
            seeds=[seq.seed for seq in seqs],
            token_bitmask=token_bitmask,
            bitmask_rows=bitmask_rows,
        )
        logits = logits.contiguous()
        if logits.is_cuda:
            tokens, _ = sample_cuda(logits, batch, self._workspace)
        else:
            tokens, _ = sample_cpu(logits, batch, self._workspace)
        return tokens.tolist()


class Logprobs:
    """Log-probabilities under the model (before temperature, penalties or any
    other processing, as vLLM reports them) for the rows that asked for them.

    Built from the logits before sampling, which overwrites them; read after.
    """

    def __init__(self, logits: torch.Tensor, seqs: list[Sequence]):
        self._num_rows = len(seqs)
        self._rows = [row for row, seq in enumerate(seqs) if seq.sampling_params.logprobs is not None]
        self._wanted = [seqs[row].sampling_params.logprobs for row in self._rows]
        if not self._rows:
            return
        rows = torch.as_tensor(self._rows, device=logits.device)
        self._logprobs = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)

    def records(self, token_ids: list[int]) -> list[TokenLogprob | None]:
        """One per row: the sampled token's logprob and top alternatives, or None
        for rows that did not ask."""
        records: list[TokenLogprob | None] = [None] * self._num_rows
        if self._rows:
            found = logprob_records(self._logprobs, [token_ids[row] for row in self._rows], self._wanted)
            for row, record in zip(self._rows, found):
                records[row] = record
        return records


def logprob_records(logprobs: torch.Tensor, token_ids: list[int], top_k: list[int]) -> list[TokenLogprob]:
    """For each row of ``logprobs`` (log-softmaxed, ``[N, vocab]``): the logprob of
    ``token_ids[i]`` and the row's ``top_k[i]`` most likely alternatives (one device read)."""
    values = logprobs.gather(1, torch.as_tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    k = max(top_k, default=0)
    top = logprobs.topk(k, dim=-1) if k else None
    top_ids = top.indices.tolist() if top else [[]] * len(token_ids)
    top_values = top.values.tolist() if top else [[]] * len(token_ids)
    return [TokenLogprob(token, value, tuple(zip(ids[:wanted], vals[:wanted])))
            for token, value, ids, vals, wanted in zip(token_ids, values, top_ids, top_values, top_k)]


def allowed_tokens(seqs: list[Sequence], vocab_size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The sampler's mask of the constrained rows: ``(token_bitmask [M, ceil(vocab / 32)],
    bitmask_rows [len(seqs)])``, row -1 for a free sequence; ``(None, None)`` when none is
    constrained. Where a constraint accepts the text so far, the sequence's stop tokens
    are allowed too (the grammar knows only EOS; the chat template may end turns otherwise)."""
    constrained = [row for row, seq in enumerate(seqs) if seq.request.constraint is not None]
    if not constrained:
        return None, None
    bitmask = np.zeros((len(constrained), (vocab_size + 31) // 32), np.int32)
    bitmask_rows = np.full(len(seqs), -1, np.int32)
    words = bitmask.view(np.uint32)
    for index, row in enumerate(constrained):
        seq = seqs[row]
        seq.request.constraint.fill_bitmask(bitmask[index])
        bitmask_rows[row] = index
        ends = seq.request.constraint.is_accepting() or not words[index].any()
        if seq.stop_token_ids and ends:  # a mask allowing nothing: end rather than sample garbage
            for token in seq.stop_token_ids:
                if 0 <= token < vocab_size:
                    words[index, token >> 5] |= np.uint32(1 << (token & 31))
    return bitmask, bitmask_rows


def suppress_stop_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Make the tokens that would end a sequence (its ``stop_token_ids``) impossible
    while it is short of its ``min_tokens`` (unless its grammar is complete: it may
    allow nothing else)."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.sampling_params.min_tokens and seq.stop_token_ids:
            constraint = seq.request.constraint
            if constraint is not None and constraint.is_accepting():
                continue
            logits[row, sorted(seq.stop_token_ids)] = float("-inf")
