"""Package attributes that import their submodule on first use (PEP 562).

A package re-exports its submodules' public names for `from pdpo_jax.eval import score_dnli`;
importing them eagerly would make every light submodule (a config section, say) pay for the
heaviest one's dependencies (grain, orbax, matplotlib).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """exports: relative submodule name ('.dnli') -> the names the package re-exports from it.
    Returns the package's (__all__, __getattr__, __dir__); the name → submodule table is kept
    as the package's `__lazy_exports__` (the import-layering test reads it)."""
    where = {name: importlib.util.resolve_name(sub, package)
             for sub, names in exports.items() for name in names}
    sys.modules[package].__lazy_exports__ = where

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
