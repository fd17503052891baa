"""Float32 helpers the CPU kernels share: fast-math flags and a vectorizable ``exp``."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

#: fastmath without nnan/ninf: -inf logits (masked tokens) must stay -inf.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _int32_as_float32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(fastmath=FASTMATH, inline="always")
def exp_nonpositive(x):
    """float32 ``exp(x)`` for ``x <= 0`` (cephes expf, ~1 ulp), vectorizable; 0 below -87."""
    clamped = max(x, np.float32(-87.0))
    n = np.floor(clamped * np.float32(1.44269504) + np.float32(0.5))
    r = clamped - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * (r * r) + r + np.float32(1.0)
    y = y * _int32_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))
    return y if x > np.float32(-87.0) else np.float32(0.0)
