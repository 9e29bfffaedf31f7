"""What every command-line entry point shares: logging set-up and how a user's mistake ends.

`run_cli(main)` runs `main()`; a `UserError` (bad config, data file, missing folder) is printed as
one line `error: …` on stderr and the process exits with status 2; any other exception is a bug
and keeps its traceback. A crash below Python (a segfault or an abort in XLA or a library) prints
every thread's Python stack before the process dies, instead of dying silently.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
from typing import Callable

from pdpo_jax.errors import UserError


class _NoTpuProbe(logging.Filter):
    """Drops JAX's INFO line about a missing libtpu.so, which every CPU and GPU run prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


def setup_logging(level: str | None = None) -> None:
    """INFO (or $PDPO_LOG) with timestamps; orbax's per-file logging and the TPU probe quieted."""
    logging.basicConfig(level=level or os.environ.get("PDPO_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
    logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbe())


def run_cli(main: Callable[[], int | None]) -> int:
    """main()'s exit status; a UserError becomes one line on stderr and status 2."""
    if not faulthandler.is_enabled() and sys.__stderr__ is not None:  # pytest enables its own
        faulthandler.enable(sys.__stderr__, all_threads=True)
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
