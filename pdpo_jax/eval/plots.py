"""PNG plots of results (matplotlib, Agg: no display needed): DNLI category bars per checkpoint,
win rates with 95% Wilson intervals, training curves from a metrics JSONL.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections import defaultdict
from collections.abc import Sequence

import matplotlib.pyplot as plt

from pdpo_jax.eval import ratings
from pdpo_jax.eval.dnli import CATEGORIES, DnliResult
from pdpo_jax.eval.tournament import Judgment
from pdpo_jax.figures import save_figure
from pdpo_jax.fileio import read_jsonl


def plot_dnli(results: dict[str, DnliResult], path: str | os.PathLike,
              normalise: str = "sum") -> pathlib.Path:
    """Grouped bars: % at rank 1 per category (x) for each checkpoint (colour)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(results), 1)
    for k, (name, result) in enumerate(results.items()):
        shares = result.rank1(normalise)["all"]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(CATEGORIES))]
        bars = ax.bar(xs, [shares[c] for c in CATEGORIES], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(CATEGORIES)),
                  ["Hits ↑", "Entail ↑", "Random ↓", "Contradict ↓"])
    ax.set_ylabel("% of examples ranked first")
    ax.set_title(f"Dialogue-NLI ranking ({normalise} of log-probs)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_win_rates(judgments: Sequence[Judgment], models: Sequence[str],
                   path: str | os.PathLike) -> pathlib.Path:
    """Win rate per model with a 95% Wilson interval (ties count half, invalid left out)."""
    recs = ratings.records(judgments, models)
    rates, errs = [], [[], []]
    for m in models:
        r = recs[m]
        score = r.wins + 0.5 * r.draws
        rate = 100.0 * score / r.n if r.n else math.nan
        lo, hi = ratings.wilson_interval(score, r.n)
        rates.append(rate)
        errs[0].append(max(rate - lo, 0) if r.n else 0)
        errs[1].append(max(hi - rate, 0) if r.n else 0)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(models)), 3.6))
    ax.bar(range(len(models)), rates, yerr=errs, capsize=4, color="tab:blue")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel("win rate [%] (ties = ½)")
    ax.set_ylim(0, 100)
    ax.set_title("Pairwise judge: win rate with 95% interval")
    return save_figure(fig, path)


def plot_training_curves(metrics: str | os.PathLike | dict[str, str | os.PathLike],
                         path: str | os.PathLike) -> pathlib.Path:
    """One panel per metric (train/x and eval/x share a panel) against step.

    metrics: a metrics.jsonl path, or {label: path} to overlay runs/stages (e.g. sft, dpo).
    """
    sources = metrics if isinstance(metrics, dict) else {"": metrics}
    series = defaultdict(list)  # panel -> [(label, xs, ys)]
    for label, file in sources.items():
        rows = read_jsonl(file)
        keys = sorted({k for r in rows for k, v in r.items()
                       if k not in ("step", "time") and isinstance(v, (int, float))})
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                name = " ".join(x for x in (label, key.split("/", 1)[0]) if x)
                series[key.split("/", 1)[-1]].append((name, *zip(*points)))
    if not series:
        raise ValueError(f"no numeric metrics with a 'step' in {list(sources.values())}")
    cols = min(3, len(series))
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, sorted(series.items())):
        for name, xs, ys in lines:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    return save_figure(fig, path)
