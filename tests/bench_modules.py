"""The bench/ scripts' modules, imported as the scripts import them (bench/ first on sys.path;
their `common` sets offline env vars at import); sys.path, os.environ and the bench modules'
entries in sys.modules are put back afterwards, so no other test sees them. Only bench/'s own
modules leave sys.modules: a library first imported inside the block (grain, jax, torch
submodules) must stay, as a second copy imported later would hold a second copy of its global
state (two such copies crashed and exhausted test workers)."""
import contextlib
import importlib
import os
import sys
import types

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@contextlib.contextmanager
def bench_modules(*names: str):
    env, path, modules = dict(os.environ), list(sys.path), set(sys.modules)
    sys.path.insert(0, BENCH)
    try:
        yield types.SimpleNamespace(**{m: importlib.import_module(m) for m in names})
    finally:
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if os.path.dirname(getattr(sys.modules[name], "__file__", None) or "") == BENCH:
                del sys.modules[name]
