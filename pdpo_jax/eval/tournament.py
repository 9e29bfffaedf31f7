"""The pairwise tournament of paper Section 4.2: sample a history and two models, show their
replies in a recorded random order, ask the judge, keep the verdict.

Planning is seeded and balanced: unordered model pairs come up in shuffled rounds (so every
pair is compared comparisons/n_pairs times, ±1), each pair's histories are drawn without
replacement while possible, and within a pair each model is shown first half of the time (±1).
An answer without [[1]]/[[2]]/[[3]] is asked again (`parse_retries` times) and then recorded
as invalid: it never counts as a tie. Identical replies are a tie without asking the judge.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.data import PersonaTurn
from pdpo_jax.eval.backends import JudgeBackend
from pdpo_jax.eval.cache import CachedJudgment, JudgmentCache, judgment_key
from pdpo_jax.eval.judge import JudgeTemplate, parse_verdict

log = logging.getLogger(__name__)
IDENTICAL = "(identical replies: a tie, not sent to the judge)"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Comparison `index`: history `history`, `first`'s reply shown as 1, `second`'s as 2."""

    index: int
    history: int
    first: str
    second: str


@dataclasses.dataclass(frozen=True)
class Judgment:
    """verdict 1: first better, 2: second better, 3: tie, None: invalid (no verdict found)."""

    comparison: Comparison
    verdict: int | None
    answer: str
    attempts: int
    cached: bool = False

    @property
    def winner(self) -> str | None:
        """The better model's name, 'tie', or None when invalid."""
        c = self.comparison
        return {1: c.first, 2: c.second, 3: "tie"}.get(self.verdict)

    def to_row(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.comparison), "verdict": self.verdict,
                "winner": self.winner, "attempts": self.attempts, "cached": self.cached,
                "answer": self.answer}


def plan_comparisons(models: Sequence[str], n_histories: int, comparisons: int,
                     seed: int) -> list[Comparison]:
    """`comparisons` balanced, seeded (history, shown order) draws over all model pairs."""
    if len(set(models)) < 2:
        raise ValueError(f"a tournament needs at least two different models, got {list(models)}; "
                         "list more eval.checkpoints")
    if n_histories < 1 or comparisons < 1:
        raise ValueError(f"need histories ({n_histories}) and comparisons ({comparisons}) >= 1")
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(models, 2))
    rounds = -(-comparisons // len(pairs))
    schedule = [pairs[i] for _ in range(rounds) for i in rng.permutation(len(pairs))][:comparisons]
    slots = defaultdict(list)  # pair -> its positions in the schedule
    for pos, pair in enumerate(schedule):
        slots[pair].append(pos)
    plan: list[Comparison | None] = [None] * comparisons
    for (a, b), positions in slots.items():
        k = len(positions)
        # Half of a pair's comparisons show `a` first; a coin decides who gets an odd one out.
        a_first = rng.permutation((np.arange(k) + rng.integers(2)) % 2 == 0)
        histories = rng.choice(n_histories, k, replace=k > n_histories)
        for pos, flag, h in zip(positions, a_first, histories):
            first, second = (a, b) if flag else (b, a)
            plan[pos] = Comparison(pos, int(h), first, second)
    return plan


def run_tournament(plan: Sequence[Comparison], histories: Sequence[PersonaTurn],
                   responses: dict[str, Sequence[str]], backend: JudgeBackend,
                   template: JudgeTemplate, cache: JudgmentCache, *, parse_retries: int = 2,
                   progress: bool = True) -> list[Judgment]:
    """Judgments for every planned comparison; answers come from the cache when present.

    responses[model][h] is `model`'s reply to histories[h]. Each final judgment is stored in
    the cache as soon as it is known, so an interrupted run resumes where it stopped.
    """
    _check_responses(plan, histories, responses)
    prompts = [_prompt(c, histories, responses, template) for c in plan]
    keys = [judgment_key(backend.judge_id, template.hash, p) for p in prompts]
    known = cache.get_many(keys)
    cached_keys = set(known)
    todo = {k: p for k, p, c in zip(keys, prompts, plan)
            if k not in known and not _identical(c, responses)}
    log.info("tournament: %d comparisons, %d cached, %d to ask %s", len(plan), len(cached_keys),
             len(todo), backend.judge_id)
    with tqdm(total=len(todo), unit="judgment", desc="judge", disable=not progress) as bar:
        known |= _ask(todo, backend, template, cache, parse_retries, bar)
    out = []
    for c, key in zip(plan, keys):
        if _identical(c, responses):
            out.append(Judgment(c, 3, IDENTICAL, 0))
        else:
            j = known[key]
            out.append(Judgment(c, j.verdict, j.answer, j.attempts, key in cached_keys))
    return out


def _ask(todo: dict[str, str], backend: JudgeBackend, template: JudgeTemplate,
         cache: JudgmentCache, parse_retries: int, bar) -> dict[str, CachedJudgment]:
    """Asks the judge for every prompt in `todo`, re-asking those without a verdict."""
    done: dict[str, CachedJudgment] = {}
    pending = list(todo)
    for attempt in range(parse_retries + 1):
        if not pending:
            break
        retry = []
        for i, answer in backend.answers([todo[k] for k in pending], attempt):
            key, verdict = pending[i], parse_verdict(answer)
            if verdict is None and attempt < parse_retries:
                retry.append(key)
                continue
            if verdict is None:
                log.warning("judge gave no verdict after %d tries; counted invalid: %r",
                            attempt + 1, answer[-200:])
            cache.put(key, backend.judge_id, template.hash, verdict, answer, attempt + 1)
            done[key] = CachedJudgment(verdict, answer, attempt + 1)
            bar.update(1)
        pending = retry
    return done


def _prompt(c: Comparison, histories, responses, template: JudgeTemplate) -> str:
    h = histories[c.history]
    return template.render(h.persona, h.history, responses[c.first][c.history],
                           responses[c.second][c.history])


def _identical(c: Comparison, responses) -> bool:
    return responses[c.first][c.history].strip() == responses[c.second][c.history].strip()


def _check_responses(plan, histories, responses) -> None:
    for model in {m for c in plan for m in (c.first, c.second)}:
        if model not in responses:
            raise ValueError(f"no responses for model {model!r}; have {sorted(responses)}")
        if len(responses[model]) != len(histories):
            raise ValueError(f"model {model!r} has {len(responses[model])} responses for "
                             f"{len(histories)} histories; they must be aligned")
