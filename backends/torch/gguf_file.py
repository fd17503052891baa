"""A GGUF file's parsed header, read once per process (by the weight loader and by the GGUF
tokenizer loader alike: this module imports neither torch nor anything of the engine).

``gguf.GGUFReader`` parses every metadata field eagerly: for a 49,152-token vocabulary
(tokens, scores, types and merges) that is seconds of Python, and the tokenizer, the
quantization choice and the weight loader each need the same header. They share one
reader per file here, keyed by the file's path, size and modification time, so a file
rewritten in place is parsed anew. The reader maps the file read-only; its tensors'
data are views of that map, copied only when a loader converts them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any


def gguf_reader(path: str | os.PathLike) -> Any:
    """The ``gguf.GGUFReader`` of the file at ``path`` (shared: callers must not modify it)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _cached_reader(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> Any:
    import gguf

    return gguf.GGUFReader(path)
