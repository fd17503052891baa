"""The C library's heap, under the Python objects: how much of it is in use, and
handing its free pages back to the operating system.

Native code (the grammar engine, llguidance, is Rust over the C library's
``malloc``) allocates where Python's own accounting does not look. glibc answers
both questions: ``mallinfo2`` sums the bytes in use over every arena (each thread
allocates from its own), and ``malloc_trim(0)`` returns the free pages of every
arena. Freed memory otherwise stays in the arena that held it, counted in the
process's resident size: a grammar that took 40 MB and failed leaves 40 MB
resident in its worker thread's arena until something there reuses it.

Resident size would be the wrong measure of a native object's size: memory that
was freed earlier and is reused does not make it grow. Bytes in use do not have
that blind spot; they do count what other threads allocate in the meantime.

Where the C library is not glibc (musl, macOS), both answer None / False and
callers fall back to estimates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _mallinfo2():
    function = getattr(_libc(), "mallinfo2", None)
    if function is not None:
        function.restype = _MallInfo2
        function.argtypes = []
    return function


@functools.cache
def _malloc_trim():
    function = getattr(_libc(), "malloc_trim", None)
    if function is not None:
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_size_t]
    return function


def heap_bytes_in_use() -> int | None:
    """Bytes the C heap has handed out and not had back, over all threads
    (``malloc``'d chunks plus the large blocks it maps directly); None without glibc."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def can_give_back_free_heap() -> bool:
    """Whether :func:`give_back_free_heap` does anything here (glibc)."""
    return _malloc_trim() is not None


def give_back_free_heap() -> bool:
    """Return the free pages of every arena to the operating system (``malloc_trim(0)``:
    a few milliseconds); False where the C library cannot."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
