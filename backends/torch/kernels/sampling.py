"""Batched token sampling: one row of logits per request, parameters per row.

The engine calls :func:`sample_cpu` or :func:`sample_cuda` once per step with
float32 logits ``[B, V]`` and a :class:`SamplingBatch`. Per row, as vLLM does:

1. tokens a structured output's grammar forbids (the row's bitmask) become
   -inf; logit bias is added; then the repetition penalty over every token seen in
   the prompt or the output (a positive logit is divided by it, any other
   multiplied); then the frequency and presence penalties over the output
   tokens (``logit -= frequency * count``, then ``logit -= presence``);
2. greedy rows (``temperature == 0``) take the argmax, the lowest id on ties;
3. other rows scale by ``1 / temperature`` and softmax; the tokens are ordered
   most likely first, the lower id first among equal logits (the order greedy
   decoding breaks ties by), and each cut keeps a prefix of that order: top-k
   the first ``top_k``, top-p the shortest prefix of those whose mass reaches
   ``top_p`` of theirs, min-p the tokens at least ``min_p`` times as likely as
   the first; one draw from the renormalised shortest prefix. Ties are cut
   like any other neighbours, so ``top_k`` keeps exactly ``top_k`` tokens and
   a ``top_p`` below the first token's probability keeps that token alone (as
   a plain sort, cumulative sum and cut would; tests/backends/kernels hold
   that reference and a sweep of planted ties against it). Probabilities
   below ``exp(-87)`` of the first token's are 0 (float32 has no normal
   number there).

The uniform behind a draw is ``random.uniform(seed, step)`` (Philox): a
request's tokens do not depend on its batch, and the CPU and CUDA kernels draw
the same tokens from the same inputs (up to last-bit rounding differences at
a cut or a draw boundary). Both also return the log-probability of the chosen
token under the distribution it was drawn from (greedy rows: under the
softmax of the processed logits).

No full sort of the vocabulary: one pass counts the tokens and their mass
above a ladder of probability levels (``_LEVELS``); only the tokens above the
highest level that must contain the kept prefix are sorted (the CPU kernel) or
ranked against each other, or bisected on when many (the CUDA kernel). All
tokens are candidates only as a fallback. A cut is then one token, the last
kept: a token is kept when it comes at or before it in the order (a greater
logit, or an equal logit and an id no greater).

``logits`` is used as scratch and holds garbage after a call.

The code is split by side: the batch the host builds (:mod:`.sampling_batch`),
the CPU kernel (:mod:`.sampling_cpu`; its launchers are here) and the CUDA
kernel with its launcher (:mod:`.sampling_cuda`, its block-wide cuts in
:mod:`.sampling_cuda_cuts`); import the public names from here.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from lmserve.backends.torch.kernels.sampling_batch import (
    SamplingBatch,
    SamplingWorkspace,
    _check_batch,
    _host_logits,
    _token_counts,
)
from lmserve.backends.torch.kernels.sampling_cpu import (
    PARALLEL_MIN_ROWS,
    PARALLEL_MIN_THREADS,
    _penalize_rows,
    _probs_rows,
    _sample_rows_parallel,
    _sample_rows_serial,
)
from lmserve.backends.torch.kernels.sampling_cuda import sample_cuda
from lmserve.core.types import SamplingParams

__all__ = [
    "PARALLEL_MIN_ROWS",
    "PARALLEL_MIN_THREADS",
    "SamplingBatch",
    "SamplingWorkspace",
    "apply_penalties_cpu",
    "sample_cpu",
    "sample_cuda",
    "sampling_probs_cpu",
    "warm_up",
]


# ---- the CPU kernel's launchers -----------------------------------------------------------


def sample_cpu(logits, batch: SamplingBatch, workspace: SamplingWorkspace | None = None, *,
               parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample one token per row of float32 ``logits`` ``[B, V]`` (numpy or a CPU tensor).

    Returns ``(token_ids int64 [B], logprobs float32 [B])``. ``logits`` is
    overwritten (scratch) when it is a C-contiguous writable float32 array.
    ``parallel``: rows over Numba's threads; None does so from
    ``PARALLEL_MIN_ROWS`` rows and ``PARALLEL_MIN_THREADS`` threads on.
    """
    logits = _host_logits(logits)
    rows, vocab_size = logits.shape
    _check_batch(batch, rows, vocab_size)
    tokens = np.empty(rows, np.int64)
    logprobs = np.empty(rows, np.float32)
    if rows == 0:
        return tokens, logprobs
    counts = _token_counts(batch, rows, vocab_size, workspace, device=False)
    if parallel is None:
        parallel = rows >= PARALLEL_MIN_ROWS and numba.get_num_threads() >= PARALLEL_MIN_THREADS
    kernel = _sample_rows_parallel if parallel else _sample_rows_serial
    probs = (workspace or SamplingWorkspace()).get("probs", rows, vocab_size, np.float32, device=False)
    kernel(logits, *batch.kernel_args(), counts, probs, tokens, logprobs)
    return tokens, logprobs


def apply_penalties_cpu(logits, batch: SamplingBatch,
                        workspace: SamplingWorkspace | None = None) -> np.ndarray:
    """Mask the tokens a row's constraint forbids (-inf), add the logit bias and apply
    the penalties, in place (the first stage of sampling)."""
    logits = _host_logits(logits)
    _check_batch(batch, *logits.shape)
    args = batch.kernel_args()
    counts = _token_counts(batch, logits.shape[0], logits.shape[1], workspace, device=False)
    _penalize_rows(logits, *args[4:7], *args[9:], counts)
    return logits


def sampling_probs_cpu(logits, batch: SamplingBatch,
                       workspace: SamplingWorkspace | None = None) -> np.ndarray:
    """The distribution each row's token is drawn from, float32 ``[B, V]`` (one-hot if greedy)."""
    logits = apply_penalties_cpu(logits, batch, workspace)
    args = batch.kernel_args()
    out = np.empty(logits.shape, np.float32)
    _probs_rows(logits, args[0], args[1], args[2], args[3], out)
    return out


def warm_up(use_cuda: bool | None = None) -> None:
    """Compile (or load from the cache) every sampling kernel on tiny inputs.

    Call before the server reports ready. ``use_cuda``: None compiles the
    CUDA kernel when a GPU (or the simulator) is available.
    """

    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.05, seed=0,
                             repetition_penalty=1.2, presence_penalty=0.5,
                             frequency_penalty=0.5, logit_bias={1: 2.0})]
    mask = np.full((1, 2), -1, np.int32)  # row 1 samples under a mask, as a structured output
    mask[0, 0] = 0b1011
    batch = SamplingBatch.from_requests(params, [[1, 2], [3]], [[4], [5, 6]],
                                        token_bitmask=mask, bitmask_rows=np.array([-1, 0], np.int32))
    logits = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    sample_cpu(logits.copy(), batch, parallel=False)
    sample_cpu(logits.copy(), batch, parallel=True)
    sampling_probs_cpu(logits.copy(), batch)
    if use_cuda or (use_cuda is None and cuda.is_available()):
        sample_cuda(cuda.to_device(logits), batch, threads=32)
