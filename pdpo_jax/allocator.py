"""Handing freed heap pages back to the OS once XLA has compiled a program.

Compiling a training step allocates a few hundred MiB (LLVM, buffer assignment) that are freed
when it ends; glibc malloc and tcmalloc both keep such pages mapped for reuse, so they stay in
the process's RSS for the whole run (bench/README.md measures ~250 MiB at the anchor shape).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _release_fn():
    process = ctypes.CDLL(None)
    try:  # tcmalloc (gperftools), e.g. LD_PRELOAD=libtcmalloc_minimal.so.4
        return "tcmalloc", process.MallocExtension_ReleaseFreeMemory
    except AttributeError:
        pass
    libc = ctypes.util.find_library("c")
    try:
        return "malloc_trim", (lambda: ctypes.CDLL(libc).malloc_trim(0)) if libc else None
    except (AttributeError, OSError):
        return None, None


def release_free_memory() -> str | None:
    """Returns the allocator's free pages to the OS: tcmalloc's ReleaseFreeMemory when tcmalloc
    is loaded, else glibc's malloc_trim(0). Returns which one ran, None where neither exists."""
    name, fn = _release_fn()
    if fn is None:
        return None
    fn()
    return name
