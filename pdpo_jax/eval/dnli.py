"""Dialogue-NLI consistency ranking (paper Section 4.4, Table 4).

Each example offers ~30 candidate replies to one persona + history: the gold reply (Hits),
replies that entail the persona (Entail), unrelated ones (Random) and ones that contradict it
(Contradict). A model ranks them by log p(candidate | prompt); the share of examples whose
top-ranked candidate falls in each category is the score (higher Hits/Entail, lower
Random/Contradict = more persona-consistent).

Scoring goes through the same code as training: `encode_pair` makes [prompt | candidate + EOS],
`sft_batch` lays rows out, `response_logps` gives the per-token log-probs the DPO step uses. All
candidates of an example share one prompt encoding and sit in consecutive rows of a batch.
Shapes are bucketed (sequence length T, response window R, fixed batch size B), so only a handful
of programs are compiled.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.data.records import DNLI_GROUPS
from pdpo_jax.tables import markdown_table
from pdpo_jax.train.logprobs import response_logps

log = logging.getLogger(__name__)

CATEGORIES = ("hits", "entail", "random", "contradict")  # Table 4 column order
SEQ_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
WINDOW_BUCKETS = (8, 16, 32, 64, 128, 256, 512)
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


# --------------------------------------------------------------------------------------------
# Scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "chunk"))
def _score_rows(graphdef, params, batch, *, window: int, chunk: int):
    """Σ log p and token count of each row's response: float32 [B], int32 [B]."""
    model = nnx.merge(graphdef, params)
    logp_BR, valid_BR = response_logps(model, batch["tokens"], batch["positions"],
                                       batch["attention_mask"], batch["loss_mask"],
                                       window=window, chunk=chunk)
    return logp_BR.sum(axis=1), valid_BR.sum(axis=1, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Row:
    example: int       # index into the examples list
    candidate: int     # index into example.candidates
    encoded: pdata.Encoded


def _encode_example(tokenizer, template, ex: pdata.DnliExample, index: int,
                    max_prompt_tokens: int | None) -> list[_Row]:
    """One row per candidate. A prompt budget independent of the candidate keeps the prompt
    identical across an example's candidates (a max_total budget would cut it per candidate)."""
    return [_Row(index, j, pdata.encode_pair(tokenizer, template, ex.persona, ex.history, text,
                                             max_prompt_tokens=max_prompt_tokens))
            for j, (text, _) in enumerate(ex.candidates)]


def _plan_batches(rows_by_example: list[list[_Row]], batch_size: int) -> list[list[_Row]]:
    """Batches of ≤ batch_size rows; examples sorted by length bucket so a batch's rows need
    the same T, and each example's candidates kept in consecutive rows."""
    def bucket(rows):
        return pdata.bucket_length(max(r.encoded.length for r in rows), SEQ_BUCKETS)
    batches, current, current_bucket = [], [], None
    for rows in sorted(rows_by_example, key=bucket):
        if current and bucket(rows) != current_bucket:
            batches.append(current)
            current = []
        current_bucket = bucket(rows)
        for row in rows:
            current.append(row)
            if len(current) == batch_size:
                batches.append(current)
                current = []
    if current:
        batches.append(current)
    return batches


def _device_batch(batch: dict[str, np.ndarray], mesh: Mesh | None):
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, shd.row_sharding(mesh, v.ndim)) for k, v in batch.items()}


def score_dnli(model, tokenizer, template, examples: Sequence[pdata.DnliExample], *,
               batch_size: int = 32, max_prompt_tokens: int | None = None, chunk: int = 32,
               mesh: Mesh | None = None, progress: bool = True) -> DnliResult:
    """Log-likelihood of every candidate of every example under `model`.

    model: an nnx model (or `(graphdef, params)`), placed on `mesh` if given (rows are then
    split over data×fsdp, so batch_size must divide by it). Each jitted call scores
    tokens int32[B, T] (B = batch_size, T a bucket) with a response window R (a bucket ≥ the
    longest candidate + EOS). An example whose prompt does not fit `max_prompt_tokens` is
    skipped and named in `result.skipped`.
    """
    graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
    if batch_size % shd.batch_divisor(mesh):
        raise ValueError(f"eval batch size {batch_size} must be divisible by data*fsdp = "
                         f"{shd.batch_divisor(mesh)}; set eval.batch_size")
    rows_by_example, prompts, skipped = [], {}, {}
    for i, ex in enumerate(examples):
        try:
            rows = _encode_example(tokenizer, template, ex, i, max_prompt_tokens)
        except pdata.DoesNotFit as e:
            skipped[ex.example_id] = str(e)
            continue
        rows_by_example.append(rows)
        prompts[ex.example_id] = tokenizer.decode(rows[0].encoded.prompt_ids)
    if not rows_by_example:
        raise ValueError(f"none of the {len(examples)} DNLI examples fits max_prompt_tokens="
                         f"{max_prompt_tokens} (persona + latest turn); raise eval.max_prompt_tokens")
    if skipped:
        log.warning("DNLI: skipped %d of %d examples that do not fit: %s", len(skipped),
                    len(examples), dict(list(skipped.items())[:3]))
    scores: list[CandidateScore] = []
    n_rows = sum(len(r) for r in rows_by_example)
    start = time.perf_counter()
    with tqdm(total=n_rows, unit="cand", desc="DNLI", disable=not progress) as bar:
        for rows, sums, counts in _run_batches(graphdef, params, rows_by_example, batch_size,
                                               pdata.pad_id(tokenizer), chunk, mesh):
            scores += [_candidate_score(examples[r.example], r, float(s), int(n))
                       for r, s, n in zip(rows, sums, counts)]
            bar.update(len(rows))
    log.info("DNLI: scored %d candidates of %d examples in %.1fs", n_rows, len(rows_by_example),
             time.perf_counter() - start)
    # Batches were planned by length; restore file order so outputs diff cleanly between runs.
    order = {ex.example_id: i for i, ex in enumerate(examples)}
    scores.sort(key=lambda c: (order[c.example_id], c.candidate_index))
    return DnliResult(scores, prompts, skipped)


def _run_batches(graphdef, params, rows_by_example, batch_size: int, pad: int, chunk: int, mesh):
    """Yields (rows, Σ log p [B], token counts [B]) per batch. Batch k+1 is dispatched before
    batch k's results are fetched, so the host's collation overlaps the device's work."""
    pending = None
    for rows in _plan_batches(rows_by_example, batch_size):
        seq_len = pdata.bucket_length(max(r.encoded.length for r in rows), SEQ_BUCKETS)
        window = pdata.bucket_length(max(len(r.encoded.response_ids) for r in rows),
                                     WINDOW_BUCKETS)
        padded = [r.encoded for r in rows] + [None] * (batch_size - len(rows))
        batch = _device_batch(pdata.sft_batch(padded, seq_len, pad), mesh)
        out = _score_rows(graphdef, params, batch, window=window, chunk=min(chunk, window))
        if pending is not None:
            yield pending[0], *jax.device_get(pending[1])
        pending = (rows, out)
    if pending is not None:
        yield pending[0], *jax.device_get(pending[1])


def _candidate_score(ex: pdata.DnliExample, row: _Row, score_sum: float, n: int) -> CandidateScore:
    if n != len(row.encoded.response_ids) or not math.isfinite(score_sum):
        raise RuntimeError(f"{ex.example_id}: scored {n} tokens (sum {score_sum}) for a "
                           f"{len(row.encoded.response_ids)}-token candidate; window too small?")
    text, category = ex.candidates[row.candidate]
    return CandidateScore(ex.example_id, ex.group, row.candidate, category, text, score_sum, n)


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
