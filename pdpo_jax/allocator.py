"""Handing freed heap pages back to the OS once XLA has compiled a program.

Compiling a training step allocates a few hundred MiB (LLVM, buffer assignment) that are freed
when it ends; glibc malloc and tcmalloc both keep such pages mapped for reuse, so they stay in
the process's RSS for the whole run (measured in docs/performance.md).
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys

TCMALLOC = "libtcmalloc_minimal.so.4"


@functools.cache
def _release_fn():
    process = ctypes.CDLL(None)  # the symbols of everything loaded, LD_PRELOADed tcmalloc first
    try:  # tcmalloc (gperftools)
        return "tcmalloc", process.MallocExtension_ReleaseFreeMemory
    except AttributeError:
        pass
    try:  # glibc; absent on macOS and musl
        trim = process.malloc_trim
    except AttributeError:
        return None, None
    return "malloc_trim", lambda: trim(0)


def synchronous_cpu_dispatch() -> None:
    """Runs XLA:CPU programs inline in the calling thread (JAX's jax_cpu_enable_async_dispatch
    off); call it before JAX creates its CPU client. XLA:CPU frees a program's temporaries
    asynchronously, after the outputs are ready, so with async dispatch the next training step
    can allocate its temporaries before the last step's are freed, and the allocator keeps both
    (docs/performance.md). Little is lost: the host work it stops overlapping is a batch's
    slicing. GPU and TPU clients are unaffected."""
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def release_free_memory() -> str | None:
    """Returns the allocator's free pages to the OS: tcmalloc's ReleaseFreeMemory when tcmalloc
    is loaded, else glibc's malloc_trim(0). Returns which one ran, None where neither exists."""
    name, fn = _release_fn()
    if fn is None:
        return None
    fn()
    return name


def find_tcmalloc() -> str | None:
    """Path of libtcmalloc_minimal.so.4 as the dynamic linker knows it (`ldconfig -p`), or None
    (install: apt-get install -y libtcmalloc-minimal4; use: LD_PRELOAD=<path>)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if TCMALLOC in line and "=>" in line:
            return line.split("=>")[1].strip()
    return None


def active() -> str:
    """'tcmalloc' when libtcmalloc is mapped into this process, else 'glibc'."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if "libtcmalloc" in maps.read() else "glibc"
    except OSError:
        return "glibc"


def use_tcmalloc(module: str, argv: list[str] | None = None) -> None:
    """Re-executes `python -m module argv…` once with tcmalloc preloaded, when it is installed
    and not loaded yet (every framework here runs 1.3–1.6x faster on it: docs/performance.md).
    Call it first thing under `if __name__ == "__main__"`, before anything allocates much.
    PDPO_ALLOCATOR=glibc keeps glibc malloc; without the library nothing happens (install:
    apt-get install -y libtcmalloc-minimal4, which `make demo` / `make test` do as root)."""
    if os.environ.get("PDPO_ALLOCATOR", "auto") == "glibc" or active() == "tcmalloc":
        return
    if os.environ.get("_PDPO_PRELOADED"):  # preloaded once already and it did not take
        return
    if "jax" in sys.modules:  # run by a launcher that set JAX up (launch/local_worker.py)
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ, _PDPO_PRELOADED="1",
               LD_PRELOAD=" ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")])))
    args = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)
