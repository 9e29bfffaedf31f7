"""release_free_memory: finds the loaded allocator and hands its free pages back."""
import os
import subprocess
import sys

import pytest

from pdpo_jax.allocator import find_tcmalloc

RSS_CODE = """
import ctypes
from pdpo_jax.allocator import release_free_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20
blocks = [ctypes.create_string_buffer(48 * 1024) for _ in range(4000)]  # ~190 MiB on the heap
del blocks[::2], blocks[1::2]  # free all but every 4th: holes the heap top cannot trim
before = rss()
print(release_free_memory(), before, rss())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("preload", ["glibc", "tcmalloc"])
def test_release_returns_freed_heap_pages(preload):
    """~140 MiB freed between live blocks stays in RSS until release_free_memory runs, which
    picks the allocator the process actually uses."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload == "tcmalloc":
        if find_tcmalloc() is None:
            pytest.skip("libtcmalloc_minimal.so.4 is not installed")
        env["LD_PRELOAD"] = find_tcmalloc()
    out = subprocess.run([sys.executable, "-c", RSS_CODE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    name, before, after = out[0], int(out[1]), int(out[2])
    assert name == ("tcmalloc" if preload == "tcmalloc" else "malloc_trim")
    assert before - after > 80, (before, after)


DISPATCH_CODE = """
import sys
import jax, jax.numpy as jnp
if sys.argv[1] == "sync":
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()
f = jax.jit(lambda a: (a @ a).sum())
a = jnp.ones((2048, 2048))
f(a).block_until_ready()
print(f(a).is_ready())  # a ~17 GFLOP program: still running unless it ran inline
"""


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_synchronous_cpu_dispatch_runs_programs_inline(mode):
    out = subprocess.run([sys.executable, "-c", DISPATCH_CODE, mode], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(mode == "sync")]


def test_train_cli_dispatches_synchronously_from_the_start(monkeypatch, capsys):
    from pdpo_jax import allocator
    from pdpo_jax.train.__main__ import main
    calls = []
    monkeypatch.setattr(allocator, "synchronous_cpu_dispatch", lambda: calls.append(1))
    assert main(["--config", "no/such/config.yaml"]) == 2
    assert calls == [1]


def test_cli_reexecutes_with_tcmalloc_once(tmp_path):
    """`python -m pdpo_jax.train` preloads tcmalloc when it is installed (the user's command
    gets the allocator the benchmarks use), once; PDPO_ALLOCATOR=glibc keeps glibc malloc."""
    if find_tcmalloc() is None:
        pytest.skip("libtcmalloc-minimal4 is not installed (make test installs it as root)")
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom pdpo_jax import allocator\n"
                     "allocator.use_tcmalloc('probe', sys.argv[1:])\nprint(allocator.active())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_PDPO_PRELOADED")}
    run = lambda extra: subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, text=True,  # noqa: E731
                                       capture_output=True, env={**env, **extra}, timeout=60)
    assert run({}).stdout.strip() == "tcmalloc"
    assert run({"PDPO_ALLOCATOR": "glibc"}).stdout.strip() == "glibc"
