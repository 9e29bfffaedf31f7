"""The bench/ scripts' modules, imported as the scripts import them (bench/ first on sys.path;
their `common` sets offline env vars at import); sys.path, sys.modules and os.environ are put
back afterwards, so no other test sees them."""
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
            del sys.modules[name]
