"""The CUDA sampling kernel's block-wide work (:mod:`.sampling_cuda`): reductions over a
thread block, and the search for each cut's last kept token.

The order of :mod:`.sampling` (logit descending, the lower id first among equal
logits) is carried by order keys (:func:`_order_key`: a logit's bits as an integer of
the same order) and token ids. A cut is the shortest prefix of that order whose count
(top-k) or mass (top-p) reaches a goal: few candidates each measure their own prefix
(:func:`_ranked_cut`), many are bisected on, key then id (:func:`_prefix_cut`).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

_SUM, _MAX, _MIN = 0, 1, 2  # the reductions of _block_reduce
_NEGATIVE_ZERO_BITS = int(np.float32(-0.0).view(np.int32))
# Order keys (:func:`_order_key`) lie in [-2**31, 2**31); these bound them on both sides.
_KEY_START = -2**31 - 1
_KEY_END = 2**31
_NO_KEY = -2**31  # below every finite or infinite float's key
#: Up to this many candidates a cut measures each one's prefix directly (a few block
#: reductions); beyond, it bisects (about 50).
_RANKED_MAX = 2048


@cuda.jit(device=True)
def _block_reduce(buf, value, op):
    """``op`` (_SUM, _MAX or _MIN) of ``value`` over the block, for every thread;
    ``buf``: a shared row of its type. (A CUDA device function cannot take an
    operator, hence the code.)"""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = buf[tid + stride]
            if op == _SUM:
                buf[tid] += other
            elif (op == _MAX and other > buf[tid]) or (op == _MIN and other < buf[tid]):
                buf[tid] = other
        cuda.syncthreads()
        stride //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _order_key(bits):
    """A float32's bits (as int32) -> an integer in the float's order (-0.0 as +0.0)."""
    if bits == _NEGATIVE_ZERO_BITS:
        return 0
    return bits if bits >= 0 else bits ^ 0x7FFFFFFF


@cuda.jit(device=True)
def _in_prefix(key, token, last_key, last_id):
    """Whether ``(key, token)`` comes at or before ``(last_key, last_id)`` in the order."""
    return key > last_key or (key == last_key and token <= last_id)


@cuda.jit(device=True)
def _ranked_cut(cand_p, cand_key, cand_id, n, bound_key, bound_id, goal, by_mass, vocab_size, ibuf):
    """:func:`_prefix_cut` for a few candidates: each candidate's prefix measured directly
    (``n * n / threads`` work), then the first of the order whose prefix reaches the goal."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    best = _NO_KEY
    for pass_ in range(2):  # the last key, then the smallest id among its ties
        first = vocab_size
        for j in range(tid, n, threads):
            key, token = cand_key[j], cand_id[j]
            if not _in_prefix(key, token, bound_key, bound_id) or (pass_ == 1 and key != best):
                continue
            if pass_ == 0 and key <= best:
                continue
            measure = 0.0
            for other in range(n):
                k, i = cand_key[other], cand_id[other]
                if _in_prefix(k, i, bound_key, bound_id) and _in_prefix(k, i, key, token):
                    measure += cand_p[other] if by_mass else 1.0
            if measure >= goal:
                if pass_ == 0:
                    best = key
                elif token < first:
                    first = token
        if pass_ == 0:
            best = _block_reduce(ibuf, best, _MAX)
    return best, _block_reduce(ibuf, first, _MIN)


@cuda.jit(device=True)
def _prefix_measure(cand_p, cand_key, cand_id, n, bound_key, bound_id, key, last_id, by_mass, fbuf,
                    ibuf):
    """How many candidates (or how much of their mass) lie in the order's prefix up to
    ``(key, last_id)`` and inside the prefix up to ``(bound_key, bound_id)``; every thread
    gets it. The order: key descending, the lower id first among equal keys."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    count = 0
    mass = 0.0
    for j in range(tid, n, threads):
        k, i = cand_key[j], cand_id[j]
        if _in_prefix(k, i, bound_key, bound_id) and _in_prefix(k, i, key, last_id):
            count += 1
            mass += cand_p[j]
    if by_mass:
        return _block_reduce(fbuf, mass, _SUM)
    return _block_reduce(ibuf, count, _SUM)


@cuda.jit(device=True)
def _prefix_cut(cand_p, cand_key, cand_id, n, bound_key, bound_id, goal, by_mass, vocab_size, fbuf,
                ibuf):
    """The shortest prefix of the order inside the bound whose count (or mass) reaches
    ``goal``, as its last token ``(key, id)``; the whole bound must reach it. Up to
    :data:`_RANKED_MAX` candidates, :func:`_ranked_cut`; beyond, it bisects on the key,
    then on the id among its ties: about 50 block reductions whatever ``n``."""
    if n <= _RANKED_MAX:
        return _ranked_cut(cand_p, cand_key, cand_id, n, bound_key, bound_id, goal, by_mass, vocab_size, ibuf)
    low, high = bound_key, _KEY_END  # the last key: the largest whose prefix reaches the goal
    while high - low > 1:
        mid = (low + high) // 2
        if _prefix_measure(cand_p, cand_key, cand_id, n, bound_key, bound_id, mid, vocab_size, by_mass,
                           fbuf, ibuf) >= goal:
            low = mid
        else:
            high = mid
    below, last = -1, vocab_size - 1  # the last id among that key's ties: the smallest that reaches it
    if low == bound_key:
        last = bound_id
    while last - below > 1:
        mid = (below + last) // 2
        if _prefix_measure(cand_p, cand_key, cand_id, n, bound_key, bound_id, low, mid, by_mass, fbuf,
                           ibuf) >= goal:
            last = mid
        else:
            below = mid
    return low, last
