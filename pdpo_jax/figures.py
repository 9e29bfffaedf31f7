"""matplotlib for reports: the headless Agg backend (selected here, before pyplot loads) and the
one way a figure is saved."""
from __future__ import annotations

import os
import pathlib

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, deterministic PNGs
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> pathlib.Path:
    """Lays out `fig`, writes it as a PNG (parent folders made) and closes it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
