"""Counter-based random numbers, identical on the CPU and on CUDA.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11; the generator behind cuRAND's and JAX's counter-based streams) hashes a
128-bit counter under a 64-bit key. A request's seed is the key and the
number of tokens it has generated so far is the counter, so the uniform draw
behind its n-th token is a pure function of ``(seed, n)``: it does not depend
on which other requests share the batch, on their order, or on the device.

The round function only multiplies 32-bit values held in 64-bit words, so no
product ever wraps: the same source compiles with ``numba.njit`` and
``numba.cuda.jit`` and runs unchanged under the CUDA simulator.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, njit

_MASK32 = np.uint64(0xFFFF_FFFF)
_SHIFT32 = np.uint64(32)
_SHIFT5 = np.uint64(5)
_SHIFT6 = np.uint64(6)
_ZERO = np.uint64(0)
_M0 = np.uint64(0xD251_1F53)  # round multipliers
_M1 = np.uint64(0xCD9E_8D57)
_W0 = np.uint64(0x9E37_79B9)  # key schedule (Weyl) increments
_W1 = np.uint64(0xBB67_AE85)


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds over counter words ``c0..c3`` and key words ``k0, k1``.

    Every argument is a ``uint64`` holding a 32-bit value; so is every result.
    """
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _make_uniform(philox):
    def uniform(seed, counter):
        """A float64 in ``[0, 1)`` with 53 random bits, from uint64 ``seed`` and ``counter``."""
        x0, x1, _, _ = philox(
            counter & _MASK32, counter >> _SHIFT32, _ZERO, _ZERO, seed & _MASK32, seed >> _SHIFT32
        )
        return ((x0 >> _SHIFT5) * 67108864.0 + (x1 >> _SHIFT6)) * (1.0 / 9007199254740992.0)

    return uniform


philox4x32_10 = njit(cache=True)(_philox4x32_10)
philox4x32_10_cuda = cuda.jit(device=True)(_philox4x32_10)
uniform = njit(cache=True)(_make_uniform(philox4x32_10))
uniform_cuda = cuda.jit(device=True)(_make_uniform(philox4x32_10_cuda))


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The draws for many ``(seed, counter)`` pairs at once (float64), for tests and tools."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    return _uniforms(seeds, counters)


@njit(cache=True)
def _uniforms(seeds, counters):
    out = np.empty(seeds.size, np.float64)
    for i in range(seeds.size):
        out[i] = uniform(seeds[i], counters[i])
    return out
