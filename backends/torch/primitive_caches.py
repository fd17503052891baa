"""Keeping the CPU's matmul primitive caches to a bounded set of shapes.

oneDNN builds a "primitive" (a JIT-compiled kernel and its plan) for every matmul
shape it meets and keeps up to 1,024 in a cache; torch's ideep layer keeps a second
cache of its own, as large, of the same primitives. Measured on SmolLM2-135M's
shapes a primitive held 150-400 KiB. The engine's shapes change with every prefill
length (the projections' row counts, the attention's query and context lengths),
so a server's memory grew for many minutes (0.3-0.5 GiB in a 10-minute soak) as
the caches filled with shapes met once.

Two measures keep it small and met early:

- :func:`bucket`: matmuls of more than :data:`EXACT_ROWS` rows (or keys) run at the
  next of 8 steps per power of two, padded (at most 12.5% more rows), so shapes are
  a few hundred that the first minutes of traffic meet;
- :func:`drop_duplicate_cache`: ideep's cache is turned off (``LRU_CACHE_CAPACITY=1``,
  unless set), as oneDNN's own cache already makes a repeated shape cost nothing:
  a packed linear of 8 rows took 57 us without it, 66 us with it.
"""

from __future__ import annotations

import os

#: Row counts up to this run as they come: every decode batch size keeps its own shape.
EXACT_ROWS = 64


def bucket(rows: int) -> int:
    """The size a matmul dimension of ``rows`` runs at: ``rows`` up to
    :data:`EXACT_ROWS`, then the next of 8 steps per power of two."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def drop_duplicate_cache() -> None:
    """Turn ideep's primitive cache off (before the process's first oneDNN matmul;
    an ``LRU_CACHE_CAPACITY`` already set is kept)."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
