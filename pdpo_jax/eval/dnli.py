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


from pdpo_jax import data as pdata
from pdpo_jax.data.records import DNLI_GROUPS
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


def dnli_table(results: dict[str, DnliResult], normalise: str = "sum", *,
               by_group: bool = False) -> str:
    """Markdown table in the layout of the paper's Table 4: one row per checkpoint (× group)."""
    _check_normalise(normalise)
    group_col = ["Group"] if by_group else []
    rows = []
    for name, result in results.items():
        table = result.rank1(normalise)
        groups = [g for g in table if g != "all"] if by_group else ["all"]
        rows += [[name, *([g] if by_group else []), *(table[g][c] for c in CATEGORIES),
                  table[g]["n"]] for g in groups]
    return markdown_table(["Checkpoint", *group_col, *_HEADERS, "n"], rows)


def dnli_report(results: dict[str, DnliResult], normalisations: Sequence[str] = NORMALISATIONS) -> str:
    """Both scorings, overall and per relation group, as one markdown section."""
    label = {"sum": "sum of token log-probs", "mean": "length-normalised (mean per token)"}
    parts = ["## Dialogue-NLI consistency ranking (Table 4 layout)",
             "% of examples whose top-ranked candidate is in each category."]
    for norm in normalisations:
        parts += [f"### Score: {label[norm]}", dnli_table(results, norm),
                  f"#### Per relation group ({norm})", dnli_table(results, norm, by_group=True)]
    return "\n\n".join(parts) + "\n"
