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
the CPU kernel and its launchers (:mod:`.sampling_cpu`) and the CUDA kernel and
its launcher (:mod:`.sampling_cuda`); import the public names from here.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from lmserve.backends.torch.kernels.sampling_batch import SamplingBatch, SamplingWorkspace
from lmserve.backends.torch.kernels.sampling_cpu import (
    PARALLEL_MIN_ROWS,
    PARALLEL_MIN_THREADS,
    apply_penalties_cpu,
    sample_cpu,
    sampling_probs_cpu,
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
