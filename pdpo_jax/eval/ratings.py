"""Statistics of a tournament: win/draw/loss rates, head-to-head counts, Bradley–Terry
strengths with bootstrap intervals, and the judge's position bias.

Invalid judgments (no verdict) are left out of every rate and reported as a count.

Bradley–Terry: P(i beats j) = σ(θ_i − θ_j). A tie counts half a win for each side, and every
pair of models gets `prior` pseudo-wins in each direction (a weak pull towards equal strength
that keeps θ finite when a model never loses). The MLE is found by Hunter's (2004) MM updates;
θ is centred to mean 0. For two models it is the closed form
θ_a − θ_b = log((w + d/2 + prior) / (l + d/2 + prior)).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from pdpo_jax.eval.bootstrap import percentile_interval, resample_counts
from pdpo_jax.eval.tournament import Judgment


@dataclasses.dataclass(frozen=True)
class Record:
    """A model's results over its valid comparisons (against anyone, or one opponent)."""

    wins: int = 0
    draws: int = 0
    losses: int = 0
    invalid: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.draws + self.losses

    def rates(self) -> tuple[float, float, float]:
        """(win %, draw %, loss %) of the valid comparisons; NaN when there are none."""
        if not self.n:
            return (math.nan,) * 3
        return tuple(100.0 * x / self.n for x in (self.wins, self.draws, self.losses))


def _add(rec: Record, outcome: str) -> Record:
    return dataclasses.replace(rec, **{outcome: getattr(rec, outcome) + 1})


def _outcome(j: Judgment, model: str) -> str:
    if j.verdict is None:
        return "invalid"
    if j.verdict == 3:
        return "draws"
    return "wins" if j.winner == model else "losses"


def records(judgments: Sequence[Judgment], models: Sequence[str]) -> dict[str, Record]:
    """Each model's wins/draws/losses over all its comparisons (paper Tables 1–2)."""
    out = {m: Record() for m in models}
    for j in judgments:
        for m in (j.comparison.first, j.comparison.second):
            out[m] = _add(out[m], _outcome(j, m))
    return out


def head_to_head(judgments: Sequence[Judgment], models: Sequence[str]) -> dict[tuple[str, str], Record]:
    """{(a, b): a's record against b} for a before b in `models` (paper Table 3 layout)."""
    rank = {m: i for i, m in enumerate(models)}
    out: dict[tuple[str, str], Record] = {}
    for j in judgments:
        a, b = sorted((j.comparison.first, j.comparison.second), key=rank.__getitem__)
        out[(a, b)] = _add(out.get((a, b), Record()), _outcome(j, a))
    return dict(sorted(out.items(), key=lambda kv: (rank[kv[0][0]], rank[kv[0][1]])))


def _win_matrix(judgments: Sequence[Judgment], index: dict[str, int]) -> np.ndarray:
    """W[i, j] = wins of i over j + half the ties (float [M, M])."""
    W = np.zeros((len(index),) * 2)
    for j in judgments:
        if j.verdict is None:
            continue
        a, b = index[j.comparison.first], index[j.comparison.second]
        if j.verdict == 3:
            W[a, b] += 0.5
            W[b, a] += 0.5
        elif j.verdict == 1:
            W[a, b] += 1
        else:
            W[b, a] += 1
    return W


def fit_bradley_terry(W: np.ndarray, prior: float = 0.1, *, tol: float = 1e-12,
                      max_iter: int = 100_000) -> np.ndarray:
    """θ [M] (mean 0) maximising Σ W_ij log σ(θ_i − θ_j) for a win matrix W [M, M]."""
    M = W.shape[0]
    W = W + prior * (1 - np.eye(M))
    N = W + W.T
    wins = W.sum(axis=1)
    if prior <= 0 and (np.any(wins == 0) or np.any(W.sum(axis=0) == 0)):
        raise ValueError("a model never wins or never loses, so Bradley–Terry strengths are "
                         "infinite; use prior > 0")
    p = np.ones(M)
    for _ in range(max_iter):
        new = wins / (N / (p[:, None] + p[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    theta = np.log(p)
    return theta - theta.mean()


@dataclasses.dataclass(frozen=True)
class Strengths:
    """Bradley–Terry θ per model with percentile bootstrap intervals (level, e.g. 0.95)."""

    models: tuple[str, ...]
    theta: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float


def bradley_terry(judgments: Sequence[Judgment], models: Sequence[str], *, prior: float = 0.1,
                  bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> Strengths:
    """θ from all valid judgments; the interval from `bootstrap` resamples of the judgments."""
    index = {m: i for i, m in enumerate(models)}
    valid = [j for j in judgments if j.verdict is not None]
    theta = fit_bradley_terry(_win_matrix(valid, index), prior)
    if bootstrap < 1 or not valid:
        return Strengths(tuple(models), theta, theta.copy(), theta.copy(), level)
    counts = resample_counts(len(valid), bootstrap, np.random.default_rng(seed))
    # Per-judgment win-matrix contributions, so a resample is one weighted sum.
    parts = np.stack([_win_matrix([j], index) for j in valid])  # [n, M, M]
    draws = np.stack([fit_bradley_terry(np.tensordot(c, parts, 1), prior) for c in counts])
    low, high = percentile_interval(draws, level)
    return Strengths(tuple(models), theta, low, high, level)


def position_bias(judgments: Sequence[Judgment]) -> dict[str, float]:
    """How often the reply shown first wins, with an exact two-sided binomial p-value of
    'first and second win equally often' over the decisive (non-tie) verdicts."""
    counts = Counter(j.verdict for j in judgments)
    first, second, ties = counts[1], counts[2], counts[3]
    decisive = first + second
    return {"valid": first + second + ties, "first_wins": first, "second_wins": second,
            "ties": ties, "invalid": counts[None],
            "first_win_rate": 100.0 * first / decisive if decisive else math.nan,
            "p_value": binomial_two_sided(first, decisive)}


def binomial_two_sided(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test: P(outcomes at most as likely as k | n, p)."""
    if n == 0:
        return 1.0
    i = np.arange(n + 1)
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
                        for x in range(n + 1)]) + i * math.log(p) + (n - i) * math.log1p(-p)
    pmf = np.exp(log_pmf)  # log space: comb(n, k) overflows a float for n in the thousands
    return float(min(1.0, pmf[pmf <= pmf[k] * (1 + 1e-9)].sum()))


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in % (for win-rate error bars)."""
    if n == 0:
        return math.nan, math.nan
    z = {0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}[level]
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * (centre - half), 100.0 * (centre + half)
