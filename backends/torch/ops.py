"""lmserve's own torch operators (``torch.ops.lmserve.*``), opaque to ``torch.compile``.

The compiled decode step (:mod:`~lmserve.backends.torch.compiled_step`) traces
the model into one graph. A few of its calls cannot be traced: the Numba
attention kernel reads the cache through numpy, and oneDNN's packed and the
weight-only matmuls take weights in layouts the compiler may only use when
they are constants. Each such call is an operator defined here, with a
*fake* implementation that gives only the output's shape and dtype: the
compiler calls the operator as it is and fuses the elementwise work around it.
Eager code calls the same operators (about 2 us of dispatch each).

An operator that writes into an argument says so in its schema (``Tensor(a!)``).
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("lmserve", "FRAGMENT")


def define_op(schema: str, implementation: Callable, fake: Callable) -> None:
    """Define ``torch.ops.lmserve.<name>`` from ``schema`` (``name(args) -> result``),
    run by ``implementation`` on CPU tensors, ``fake`` giving its output's shape."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    # Every operator here runs on the CPU only; oneDNN's packed weights are MkldnnCPU tensors.
    for dispatch_key in ("CPU", "MkldnnCPU"):
        _LIBRARY.impl(name, implementation, dispatch_key)
    torch.library.register_fake(f"lmserve::{name}", fake, lib=_LIBRARY)
