"""The percentile bootstrap of the evaluation: one resampler for the Bradley–Terry intervals
(`ratings.bradley_terry`) and the paired Dialogue-NLI differences (`dnli.paired_differences`).

A resample draws n items with replacement; it is kept as counts (how often each item was drawn),
so a statistic that is a weighted sum over items is one matrix product for all resamples.

Paired difference of shares: two models judged on the same n examples, item i having the
one-hot outcome a_i (first model) and b_i (second) over K categories. A resample with counts
c (Σ c = n) gives each category's share difference 100 · Σ_i c_i (b_i − a_i) / n, so examples
both models put in the same category add nothing, and the interval reflects only the
examples on which they differ (an unpaired bootstrap of two shares would add both models'
sampling noise, though they answer the same examples).
"""
from __future__ import annotations

import dataclasses

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [resamples, n]: how often each of n items is drawn in each resample of n with
    replacement (resample r draws `rng.integers(n, size=n)`, in order)."""
    draws = rng.integers(n, size=(resamples, n))
    offsets = draws + n * np.arange(resamples)[:, None]
    return np.bincount(offsets.ravel(), minlength=resamples * n).reshape(resamples, n)


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the (1 − level)/2 and (1 + level)/2 quantiles of draws over axis 0."""
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha], axis=0)
    return low, high


@dataclasses.dataclass(frozen=True)
class Difference:
    """Second minus first, in percentage points, with its percentile bootstrap interval."""

    diff: float
    low: float
    high: float

    def cell(self) -> str:
        return f"{self.diff:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_share_differences(first: np.ndarray, second: np.ndarray, *,
                             resamples: int = RESAMPLES, seed: int = 0,
                             level: float = LEVEL) -> list[Difference]:
    """Per category k: share(second) − share(first) in percentage points and its paired
    bootstrap interval, from one-hot outcomes first, second [n, K] of the same n items."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    n = first.shape[0]
    if second.shape != first.shape or n == 0:
        raise ValueError(f"paired outcomes need the same n > 0 items: {first.shape} vs "
                         f"{second.shape}")
    delta_nK = second - first
    diff_K = 100.0 * delta_nK.mean(axis=0)
    counts = resample_counts(n, resamples, np.random.default_rng(seed))
    draws_RK = 100.0 * (counts @ delta_nK) / n
    low, high = percentile_interval(draws_RK, level)
    return [Difference(float(d), float(lo), float(hi)) for d, lo, hi in zip(diff_K, low, high)]
