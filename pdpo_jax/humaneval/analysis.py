"""Statistics of a human evaluation against the LLM judge (paper §4.3 and Table 3).

Outcomes are model A's against model B: WIN, DRAW, LOSS. Per pair the human label is the
majority of its annotators: the most frequent outcome, and a draw when two or more outcomes
share the highest count (2 A / 1 tie is a win; 1 A / 1 B and 1 A / 1 B / 1 tie are draws).
The judge's label is its verdict (invalid verdicts are left out of every judge statistic).

Every statistic is a function of per-pair weights [R, P], so one call evaluates it at the data
(weights 1) and at R bootstrap resamples of the pairs (multinomial weights): the interval is
the seeded percentile interval over pairs. Rates are in %, κ as a fraction.

Cohen's κ = (p_o − p_e) / (1 − p_e) on the 3×3 table of human majority × judge.
Fleiss' κ among annotators, generalised to pairs with different numbers of raters n_i:
P_i = Σ_j n_ij (n_ij − 1) / (n_i (n_i − 1)) over pairs with n_i ≥ 2, P̄ their mean,
p_j = Σ_i n_ij / Σ_i n_i, P_e = Σ_j p_j², κ = (P̄ − P_e) / (1 − P_e): Fleiss' (1971) κ
when every pair has the same number of raters.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pdpo_jax.eval.ratings import binomial_two_sided, wilson_interval
from pdpo_jax.humaneval.pairs import Pair

WIN, DRAW, LOSS = 0, 1, 2
OUTCOMES = ("Win", "Draw", "Loss")
NONE = -1  # no valid judge verdict


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic at the data and its bootstrap interval; n: what it counts (pairs, or
    annotations for per-annotation rates: the denominator of a rate)."""

    value: float
    low: float
    high: float
    n: int


def bootstrap(stat: Callable[[np.ndarray], np.ndarray], n: int, *, reps: int = 1000,
              seed: int = 0, level: float = 0.95, count: int | None = None) -> Estimate:
    """stat: weights [R, n] over the n pairs -> values [R]. Percentile interval of `reps`
    resamples of the pairs with replacement; NaN resamples (an empty subset) are dropped.
    `count` is the Estimate's n (default: n)."""
    count = n if count is None else count
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(stat(np.ones((1, n)))[0]) if n else math.nan
        if n == 0 or reps < 1:
            return Estimate(value, math.nan, math.nan, count)
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(float)
        values = stat(weights)
    values = values[np.isfinite(values)]
    if not len(values):
        return Estimate(value, math.nan, math.nan, count)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(low), float(high), count)


def majority(labels: Sequence[int]) -> int:
    """The most frequent outcome; a tie for the top count is a DRAW (module docstring)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=3)
    top = np.flatnonzero(counts == counts.max())
    return int(top[0]) if len(top) == 1 else DRAW


def cohen_kappa(table: np.ndarray) -> np.ndarray:
    """κ of a [..., k, k] agreement table (rows one rater, columns the other)."""
    table = np.asarray(table, dtype=float)
    n = table.sum(axis=(-2, -1))
    p_o = np.trace(table, axis1=-2, axis2=-1) / n
    p_e = (table.sum(axis=-1) * table.sum(axis=-2)).sum(axis=-1) / n**2
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """κ of counts [P, k] (n_ij: raters of pair i choosing j), pairs with n_i ≥ 2 only;
    weights [R, P] (default one row of ones) -> [R]."""
    counts = np.asarray(counts, dtype=float)
    n_i = counts.sum(axis=1)
    rated = n_i >= 2
    counts, n_i = counts[rated], n_i[rated]
    w = np.ones((1, len(rated))) if weights is None else np.asarray(weights, dtype=float)
    w = w[:, rated]
    p_i = (counts * (counts - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_bar = w @ p_i / w.sum(axis=1)
    p_j = (w @ counts) / (w @ n_i)[:, None]
    p_e = (p_j**2).sum(axis=1)
    return (p_bar - p_e) / (1 - p_e)


@dataclasses.dataclass(frozen=True)
class Votes:
    """The human judgments of the pairs comparing `a` and `b`.

    pair_ids [P]: pairs with at least one judgment; judge [P]: the judge's outcome or NONE.
    Per judgment [J]: item (index into pair_ids), annotator, outcome (A's), choice (shown
    position: 1, 2, 3 = tie)."""

    a: str
    b: str
    pair_ids: np.ndarray
    judge: np.ndarray
    item: np.ndarray
    annotator: np.ndarray
    outcome: np.ndarray
    choice: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """[P, 3] judgments per pair and outcome."""
        out = np.zeros((len(self.pair_ids), 3), dtype=int)
        np.add.at(out, (self.item, self.outcome), 1)
        return out

    @property
    def human(self) -> np.ndarray:
        """[P] the majority outcome of each pair."""
        return np.array([majority(np.repeat(np.arange(3), c)) for c in self.counts], dtype=int)


def outcome(winner: str, a: str, b: str) -> int:
    """A's outcome given the winning model or 'tie'."""
    table = {a: WIN, b: LOSS, "tie": DRAW}
    if winner not in table:
        raise ValueError(f"winner {winner!r} is neither {a!r}, {b!r} nor 'tie'")
    return table[winner]


def judge_outcome(pair: Pair, a: str) -> int:
    if pair.verdict is None:
        return NONE
    if pair.verdict == 3:
        return DRAW
    return WIN if pair.models[pair.verdict - 1] == a else LOSS


def pick_models(pairs: Sequence[Pair], a: str | None, b: str | None) -> tuple[str, str]:
    """(A, B): as given, or the one model pair the pairs compare (alphabetical)."""
    compared = sorted({tuple(sorted(p.models)) for p in pairs})
    if a is not None and b is not None:
        if tuple(sorted((a, b))) not in compared:
            raise ValueError(f"no judged pair compares {a!r} with {b!r}; the pairs compare "
                             f"{[' vs '.join(c) for c in compared]}; fix --a/--b")
        return a, b
    if len(compared) != 1:
        raise ValueError(f"the judged pairs compare {len(compared)} model pairs "
                         f"({[' vs '.join(c) for c in compared]}); pick one with --a and --b")
    return compared[0]


def collect(judgments: Sequence[Mapping], pairs: Mapping[int, Pair], a: str | None = None,
            b: str | None = None) -> Votes:
    """Votes from exported judgments (store.read_judgments rows) and the judge's pairs."""
    for row in judgments:
        pair = pairs.get(row["pair"])
        if pair is None or {row["shown_1"], row["shown_2"]} != set(pair.models):
            raise ValueError(f"judgment {row['assignment']} of pair {row['pair']} "
                             f"({row['shown_1']} vs {row['shown_2']}) does not match the judge's "
                             "pairs; pass the --judge folder the study was served from")
    a, b = pick_models([pairs[r["pair"]] for r in judgments] or list(pairs.values()), a, b)
    rows = [r for r in judgments if set(pairs[r["pair"]].models) == {a, b}]
    pair_ids = np.array(sorted({r["pair"] for r in rows}), dtype=int)
    index = {int(p): i for i, p in enumerate(pair_ids)}
    return Votes(
        a, b, pair_ids, np.array([judge_outcome(pairs[int(p)], a) for p in pair_ids], dtype=int),
        np.array([index[r["pair"]] for r in rows], dtype=int),
        np.array([r["annotator"] for r in rows], dtype=object),
        np.array([outcome(r["winner"], a, b) for r in rows], dtype=int),
        np.array([{"1": 1, "2": 2, "tie": 3}[r["choice"]] for r in rows], dtype=int))


def share(hit: np.ndarray, among: np.ndarray, reps: int = 1000, seed: int = 0) -> Estimate:
    """% of `among` that is `hit` (per pair or per judgment: 0/1 or counts), resampling those
    units; n = among's total."""
    hit, among = np.asarray(hit, float), np.asarray(among, float)
    return bootstrap(lambda w: 100.0 * (w @ hit) / (w @ among), len(among), reps=reps, seed=seed,
                     count=int(among.sum()))


def table3(votes: Votes, reps: int = 1000, seed: int = 0) -> dict[str, list[Estimate]]:
    """{'human': [win, draw, loss], 'judge': [...]} in % of pairs, the paper's Table 3."""
    human, judge = votes.human, votes.judge
    everyone, valid = np.ones(len(human)), judge != NONE
    return {"human": [share(human == k, everyone, reps, seed) for k in range(3)],
            "judge": [share(judge == k, valid, reps, seed) for k in range(3)]}


def agreement(votes: Votes, reps: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Human majority vs judge: % agreeing with draws, % agreeing when neither said draw
    (the paper's 78%), the same per annotation, and Cohen's κ (3 outcomes)."""
    human, judge, n = votes.human, votes.judge, len(votes.pair_ids)
    valid = judge != NONE
    decisive = valid & (human != DRAW) & (judge != DRAW)
    cells = np.zeros((n, 9))
    cells[np.flatnonzero(valid), (human * 3 + judge)[valid]] = 1
    # per annotation: each judgment against the judge's verdict on its pair, neither a draw
    j_dec = (votes.outcome != DRAW) & (judge[votes.item] != DRAW) & (judge[votes.item] != NONE)
    j_match = j_dec & (votes.outcome == judge[votes.item])

    def per_pair(x):
        return np.bincount(votes.item, weights=x.astype(float), minlength=n)

    def kappa(w):
        return cohen_kappa((w @ cells).reshape(-1, 3, 3))

    return {"with_draws": share(valid & (human == judge), valid, reps, seed),
            "without_draws": share(decisive & (human == judge), decisive, reps, seed),
            "annotations_without_draws": share(per_pair(j_match), per_pair(j_dec), reps, seed),
            "cohen_kappa": bootstrap(kappa, n, reps=reps, seed=seed, count=int(valid.sum()))}


def confusion(votes: Votes) -> np.ndarray:
    """[3, 3] pairs by human majority (rows) and judge (columns), valid verdicts only."""
    valid = votes.judge != NONE
    out = np.zeros((3, 3), dtype=int)
    np.add.at(out, (votes.human[valid], votes.judge[valid]), 1)
    return out


def fleiss(votes: Votes, reps: int = 1000, seed: int = 0) -> tuple[Estimate, dict[int, int]]:
    """Fleiss' κ among annotators (pairs with ≥ 2 judgments) and {raters: pairs}."""
    counts = votes.counts
    rated = counts[counts.sum(axis=1) >= 2]
    raters = dict(sorted(Counter(int(x) for x in counts.sum(axis=1)).items()))
    return bootstrap(lambda w: fleiss_kappa(rated, w), len(rated), reps=reps, seed=seed), raters


def position_bias(votes: Votes, reps: int = 1000, seed: int = 0) -> dict:
    """Share of decisive human answers choosing the reply shown as 1: bootstrap over pairs,
    Wilson interval and exact two-sided binomial p of 'no preference for either position'."""
    n = len(votes.pair_ids)
    first = np.bincount(votes.item, weights=(votes.choice == 1).astype(float), minlength=n)
    decisive = np.bincount(votes.item, weights=(votes.choice != 3).astype(float), minlength=n)
    k, m = int(first.sum()), int(decisive.sum())
    return {"decisive": m, "chose_1": k,
            "share": share(first, decisive, reps, seed),
            "wilson": wilson_interval(k, m), "p_value": binomial_two_sided(k, m)}


def annotator_stats(votes: Votes, reps: int = 1000, seed: int = 0) -> list[dict]:
    """Per annotator: judgments, % A wins, % draws, % agreeing with the majority of the other
    annotators of the same pair (pairs others judged too), % agreeing with the judge."""
    others = _others_majority(votes)
    out = []
    for name in sorted(set(votes.annotator)):
        mine = np.flatnonzero(votes.annotator == name)
        o, judge = votes.outcome[mine], votes.judge[votes.item[mine]]
        ones, other = np.ones(len(mine)), others[mine]
        out.append({"annotator": name, "n": len(mine),
                    "win": share(o == WIN, ones, reps, seed),
                    "draw": share(o == DRAW, ones, reps, seed),
                    "agree_others": share((other == o) & (other != NONE), other != NONE, reps, seed),
                    "agree_judge": share((judge == o) & (judge != NONE), judge != NONE, reps, seed)})
    return out


def _others_majority(votes: Votes) -> np.ndarray:
    """[J] the majority outcome of the other annotators of each judgment's pair, or NONE."""
    out = np.full(len(votes.item), NONE)
    by_pair = defaultdict(list)
    for j, i in enumerate(votes.item):
        by_pair[i].append(j)
    for js in by_pair.values():
        for j in js:
            rest = [votes.outcome[k] for k in js if votes.annotator[k] != votes.annotator[j]]
            if rest:
                out[j] = majority(rest)
    return out


def analyse(votes: Votes, reps: int = 1000, seed: int = 0) -> dict:
    """Everything the report shows (see the functions above)."""
    kappa, raters = fleiss(votes, reps, seed)
    return {"a": votes.a, "b": votes.b, "pairs": len(votes.pair_ids),
            "judgments": len(votes.item), "annotators": len(set(votes.annotator)),
            "judge_valid": int((votes.judge != NONE).sum()),
            "table3": table3(votes, reps, seed), "agreement": agreement(votes, reps, seed),
            "confusion": confusion(votes), "fleiss_kappa": kappa, "raters": raters,
            "position_bias": position_bias(votes, reps, seed),
            "annotators_stats": annotator_stats(votes, reps, seed)}
