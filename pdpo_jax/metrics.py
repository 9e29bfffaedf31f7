"""Metrics go to JSONL (one object per line) and TensorBoard event files, side by side."""
from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else None


class MetricsWriter:
    def __init__(self, directory: str | pathlib.Path, tensorboard: bool = True,
                 enabled: bool = True):
        """enabled=False (every process but the first of a multi-host run) writes nothing."""
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        if enabled:
            self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        row = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is None:
                continue
            name = prefix + key
            row[name] = scalar
            if self._tb is not None and isinstance(scalar, (int, float)) and math.isfinite(scalar):
                self._tb.add_scalar(name, scalar, int(step))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        return row

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
