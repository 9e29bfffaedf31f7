"""Dialogue-NLI consistency ranking (paper Section 4.4, Table 4).

Each example offers ~30 candidate replies to one persona + history: the gold reply (Hits),
replies that entail the persona (Entail), unrelated ones (Random) and ones that contradict it
(Contradict). A model ranks them by log p(candidate | prompt); the share of examples whose
top-ranked candidate falls in each category is the score (higher Hits/Entail, lower
Random/Contradict = more persona-consistent).

This module holds the metric: candidate scores, rank-1 shares, the Table 4 layout and the
choice of examples. Scoring with a model is `dnli_scoring.score_dnli`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdpo_jax import data as pdata
from pdpo_jax.data.records import DNLI_GROUPS
from pdpo_jax.eval import bootstrap
from pdpo_jax.tables import markdown_table

log = logging.getLogger(__name__)

CATEGORIES = ("hits", "entail", "random", "contradict")  # Table 4 column order
NORMALISATIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class CandidateScore:
    """One candidate's log-likelihood: score_sum = Σ log p over its n_tokens tokens (EOS included)."""

    example_id: str
    group: str
    candidate_index: int
    category: str
    candidate: str
    score_sum: float
    n_tokens: int

    def score(self, normalise: str) -> float:
        """'sum': total log-prob; 'mean': per token (length-normalised)."""
        return self.score_sum if normalise == "sum" else self.score_sum / max(self.n_tokens, 1)


@dataclasses.dataclass
class DnliResult:
    """All candidate scores of one model, plus each example's prompt text (for error analysis)."""

    scores: list[CandidateScore]
    prompts: dict[str, str]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # example id -> reason

    def winners(self, normalise: str = "sum") -> dict[str, CandidateScore]:
        """Each example's top-ranked candidate; ties go to the earlier candidate (file order)."""
        _check_normalise(normalise)
        best: dict[str, CandidateScore] = {}
        for c in self.scores:
            cur = best.get(c.example_id)
            if cur is None or c.score(normalise) > cur.score(normalise):
                best[c.example_id] = c
        return best

    def rank1(self, normalise: str = "sum") -> dict[str, dict[str, float]]:
        """{'all' | group: {category: % of examples whose winner is in it, 'n': examples}}."""
        by_group: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for w in self.winners(normalise).values():
            by_group["all"][w.category] += 1
            by_group[w.group][w.category] += 1
        order = ["all"] + [g for g in DNLI_GROUPS if g in by_group]
        order += sorted(set(by_group) - set(order))
        return {g: _percentages(by_group[g]) for g in order}

    def to_rows(self) -> list[dict[str, Any]]:
        """Per-candidate JSONL rows (the layout `from_rows` reads back)."""
        return [dict(dataclasses.asdict(c), prompt=self.prompts[c.example_id]) for c in self.scores]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> "DnliResult":
        fields = {f.name for f in dataclasses.fields(CandidateScore)}
        scores = [CandidateScore(**{k: r[k] for k in fields}) for r in rows]
        return cls(scores, {r["example_id"]: r["prompt"] for r in rows})


def _percentages(counts: collections.Counter) -> dict[str, float]:
    n = sum(counts.values())
    return {**{c: 100.0 * counts[c] / n if n else math.nan for c in CATEGORIES}, "n": n}


def _check_normalise(normalise: str) -> None:
    if normalise not in NORMALISATIONS:
        raise ValueError(f"score normalisation {normalise!r} is not one of {NORMALISATIONS}; "
                         "set eval.normalise")


def select_examples(examples: Sequence[pdata.DnliExample],
                    max_examples: int | None) -> list[pdata.DnliExample]:
    """The first `max_examples`, taken round-robin over relation groups so every group that
    exists keeps examples (a plain prefix would be all 'attributes'); None = all."""
    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    queues = collections.defaultdict(collections.deque)
    for ex in examples:
        queues[ex.group].append(ex)
    chosen = []
    while len(chosen) < max_examples:
        for group in list(queues):
            if queues[group] and len(chosen) < max_examples:
                chosen.append(queues[group].popleft())
    order = {ex.example_id: i for i, ex in enumerate(examples)}
    return sorted(chosen, key=lambda ex: order[ex.example_id])


# --------------------------------------------------------------------------------------------
# Tables


_HEADERS = ("Hits↑", "Entail↑", "Rand↓", "Contradict↓")
SMOKE_EXAMPLES = 100  # fewer examples than this: a table is a smoke signal, not a measurement

# {checkpoint after the first: {'all' | group: [Difference per category], 'n': ...}}
Differences = dict[str, dict[str, Any]]


def _outcomes(result: DnliResult, normalise: str) -> dict[str, tuple[str, int]]:
    """{example id: (group, category index of its winner)}."""
    return {k: (w.group, CATEGORIES.index(w.category))
            for k, w in result.winners(normalise).items()}


def paired_differences(results: dict[str, DnliResult], normalise: str = "sum", *,
                       resamples: int = bootstrap.RESAMPLES, seed: int = 0,
                       level: float = bootstrap.LEVEL) -> Differences:
    """Each checkpoint after the first against the first: per category, the difference of
    rank-1 shares (points) with its paired bootstrap interval over the examples both scored,
    overall ('all') and per relation group; 'n' holds the examples each was computed on."""
    _check_normalise(normalise)
    names = list(results)
    base = _outcomes(results[names[0]], normalise)
    out: Differences = {}
    for name in names[1:]:
        other = _outcomes(results[name], normalise)
        shared = [k for k in base if k in other]
        groups = ["all"] + [g for g in DNLI_GROUPS if any(base[k][0] == g for k in shared)]
        groups += sorted({base[k][0] for k in shared} - set(groups))
        out[name] = {"n": {}}
        for g in groups:
            keys = [k for k in shared if g == "all" or base[k][0] == g]
            eye = np.eye(len(CATEGORIES))
            out[name][g] = bootstrap.paired_share_differences(
                eye[[base[k][1] for k in keys]], eye[[other[k][1] for k in keys]],
                resamples=resamples, seed=seed, level=level)
            out[name]["n"][g] = len(keys)
    return out


def dnli_table(results: dict[str, DnliResult], normalise: str = "sum", *,
               by_group: bool = False, differences: Differences | None = None) -> str:
    """Markdown table in the layout of the paper's Table 4: one row per checkpoint (× group),
    then for each later checkpoint its difference from the first with the paired bootstrap
    95% interval (`paired_differences`, computed here unless given)."""
    _check_normalise(normalise)
    if differences is None:
        differences = paired_differences(results, normalise)
    group_col = ["Group"] if by_group else []
    first = next(iter(results), "")
    rows = []
    for name, result in results.items():
        table = result.rank1(normalise)
        groups = [g for g in table if g != "all"] if by_group else ["all"]
        rows += [[name, *([g] if by_group else []), *(table[g][c] for c in CATEGORIES),
                  table[g]["n"]] for g in groups]
    for name, diff in differences.items():
        groups = [g for g in diff if g not in ("all", "n")] if by_group else ["all"]
        rows += [[f"Δ {name} − {first} (95% CI)", *([g] if by_group else []),
                  *(d.cell() for d in diff[g]), diff["n"][g]] for g in groups]
    return markdown_table(["Checkpoint", *group_col, *_HEADERS, "n"], rows)


def _smoke_note(results: dict[str, DnliResult], normalise: str, by_group: bool) -> list[str]:
    small = {f"{g} ({t['n']})" for r in results.values() for g, t in r.rank1(normalise).items()
             if (g != "all") == by_group and t["n"] < SMOKE_EXAMPLES}
    if not small:
        return []
    return [f"**Smoke signal:** fewer than {SMOKE_EXAMPLES} examples in "
            f"{', '.join(sorted(small))}; read the shares as a plumbing check, not a measurement."]


def all_differences(results: dict[str, DnliResult],
                    normalisations: Sequence[str] = NORMALISATIONS) -> dict[str, Differences]:
    """{normalisation: paired_differences} for each scoring."""
    return {norm: paired_differences(results, norm) for norm in normalisations}


def dnli_statistics(results: dict[str, DnliResult], normalisations: Sequence[str] = NORMALISATIONS,
                    differences: dict[str, Differences] | None = None) -> dict[str, Any]:
    """What `dnli_report` shows, as JSON (eval/dnli/summary.json): each checkpoint's rank-1
    shares and the paired differences from the first checkpoint, per scoring."""
    differences = differences or all_differences(results, normalisations)
    out: dict[str, Any] = {"resamples": bootstrap.RESAMPLES, "level": bootstrap.LEVEL,
                           "seed": 0, "baseline": next(iter(results), None), "scores": {}}
    for norm in normalisations:
        diffs = differences[norm]
        out["scores"][norm] = {
            "rank1": {name: r.rank1(norm) for name, r in results.items()},
            "differences": {name: {g: {"n": d["n"][g], **{c: dataclasses.asdict(x) for c, x in
                                                      zip(CATEGORIES, d[g])}}
                                   for g in d if g != "n"} for name, d in diffs.items()}}
    return out


def dnli_report(results: dict[str, DnliResult], normalisations: Sequence[str] = NORMALISATIONS,
                differences: dict[str, Differences] | None = None) -> str:
    """Both scorings, overall and per relation group, as one markdown section."""
    differences = differences or all_differences(results, normalisations)
    label = {"sum": "sum of token log-probs", "mean": "length-normalised (mean per token)"}
    parts = ["## Dialogue-NLI consistency ranking (Table 4 layout)",
             "% of examples whose top-ranked candidate is in each category; n examples. "
             "Δ rows: a later checkpoint minus the first, in points, with the paired bootstrap "
             f"95% interval ({bootstrap.RESAMPLES:,} resamples of the examples both scored)."]
    for norm in normalisations:
        diffs = differences[norm]
        parts += [f"### Score: {label[norm]}", *_smoke_note(results, norm, False),
                  dnli_table(results, norm, differences=diffs),
                  f"#### Per relation group ({norm})", *_smoke_note(results, norm, True),
                  dnli_table(results, norm, by_group=True, differences=diffs)]
    return "\n\n".join(parts) + "\n"
