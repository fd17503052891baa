"""Numba kernels of the torch backend: a CPU ``@njit`` twin for every ``@cuda.jit`` kernel.

- ``sampling``: batched token sampling (penalties, greedy, temperature,
  top-k, top-p, min-p) with counter-based per-request randomness; its code
  lies in ``sampling_batch`` (the host-built batch), ``sampling_cpu`` and
  ``sampling_cuda`` (the kernels and their launchers);
- ``random``: the Philox counter-based generator both devices share;
- ``attention``: decode attention reading the paged cache in place (CPU only:
  CUDA decodes use torch's fused attention).

The paged cache needs no kernel of its own: new keys and values are stored with
torch's ``index_copy_`` (``attention.py``), and CPU decodes read their blocks in
place through ``attention``.

Importing needs no GPU. Call :func:`warm_up` before the server reports ready:
it compiles the kernels (or loads them from Numba's on-disk cache).
"""

from __future__ import annotations

from lmserve.backends.torch.kernels import sampling


def warm_up(use_cuda: bool | None = None) -> None:
    """Compile the sampling kernels; CUDA ones too when a GPU is available
    (``use_cuda=None``) or asked for. The decode attention kernel is compiled per
    model shape, by the engine's warm-up decode."""
    sampling.warm_up(use_cuda)
