"""Tournament planning balance and the rating arithmetic against hand-computed values."""
import itertools
import math
from collections import Counter

import numpy as np
import pytest

from pdpo_jax.data import PersonaTurn
from pdpo_jax.eval import (Comparison, JudgmentCache, Judgment, bradley_terry, fit_bradley_terry,
                           head_to_head, load_template, plan_comparisons, position_bias, records,
                           run_tournament)
from pdpo_jax.eval.ratings import binomial_two_sided, wilson_interval


def test_plan_is_balanced_and_seeded():
    models = ["sft", "dpo", "rl"]
    plan = plan_comparisons(models, n_histories=500, comparisons=300, seed=0)
    assert [c.index for c in plan] == list(range(300))
    pairs = Counter(frozenset((c.first, c.second)) for c in plan)
    assert sorted(pairs.values()) == [100, 100, 100]
    firsts = Counter((c.first, c.second) for c in plan)
    assert all(firsts[(a, b)] == 50 for a, b in itertools.permutations(models, 2))
    assert all(c.first != c.second for c in plan)
    for pair in pairs:  # histories of a pair drawn without replacement while they last
        hs = [c.history for c in plan if frozenset((c.first, c.second)) == pair]
        assert len(set(hs)) == len(hs)
    assert plan == plan_comparisons(models, 500, 300, seed=0)
    assert plan != plan_comparisons(models, 500, 300, seed=1)
    # Odd counts: the shown-first split differs by at most one, overall and per pair.
    odd = plan_comparisons(models, 10, 31, seed=3)
    per_pair = Counter(frozenset((c.first, c.second)) for c in odd)
    assert sorted(per_pair.values()) == [10, 10, 11]
    for pair, k in per_pair.items():
        a = sorted(pair)[0]
        shown = sum(c.first == a for c in odd if frozenset((c.first, c.second)) == pair)
        assert abs(2 * shown - k) <= 1
    with pytest.raises(ValueError, match="at least two different models"):
        plan_comparisons(["only"], 5, 3, seed=0)


def _judgments(spec):
    """spec: [(first, second, verdict)] → Judgments on history 0."""
    return [Judgment(Comparison(i, 0, a, b), v, "", 1) for i, (a, b, v) in enumerate(spec)]


# a vs b, a shown first in 6 and second in 4: a wins 6 (4 of them shown first), b wins 2,
# 2 ties, plus 1 invalid verdict.
SPEC = ([("a", "b", 1)] * 4 + [("b", "a", 2)] * 2 + [("a", "b", 2)] * 1 + [("b", "a", 1)] * 1 +
        [("a", "b", 3), ("b", "a", 3), ("a", "b", None)])


def test_win_draw_loss_and_head_to_head_by_hand():
    js = _judgments(SPEC)
    rec = records(js, ["a", "b"])
    assert (rec["a"].wins, rec["a"].draws, rec["a"].losses, rec["a"].invalid) == (6, 2, 2, 1)
    assert (rec["b"].wins, rec["b"].draws, rec["b"].losses) == (2, 2, 6)
    assert rec["a"].rates() == pytest.approx((60.0, 20.0, 20.0))
    h2h = head_to_head(js, ["b", "a"])
    assert list(h2h) == [("b", "a")]
    assert h2h[("b", "a")].rates() == pytest.approx((20.0, 20.0, 60.0))
    assert [j.winner for j in js[:2]] == ["a", "a"] and js[-1].winner is None and js[-2].winner == "tie"


def test_bradley_terry_two_models_closed_form():
    js = _judgments(SPEC)
    # Ties are half wins: a has 6 + 1 = 7 "wins", b has 2 + 1 = 3; the MLE of θa − θb is log(7/3).
    for prior in (0.0, 0.1, 1.0):
        s = bradley_terry(js, ["a", "b"], prior=prior, bootstrap=0)
        expected = math.log((7 + prior) / (3 + prior))
        assert s.theta[0] - s.theta[1] == pytest.approx(expected, abs=1e-9)
        assert s.theta.sum() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_three_models_satisfies_score_equations():
    W = np.array([[0, 7, 3], [2, 0, 5], [4, 1, 0]], float)
    theta = fit_bradley_terry(W, prior=0.0)
    # At the MLE, each model's observed wins equal its expected wins Σ_j N_ij σ(θi − θj).
    N = W + W.T
    sigma = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
    np.testing.assert_allclose((N * sigma).sum(axis=1), W.sum(axis=1), atol=1e-8)
    with pytest.raises(ValueError, match="prior > 0"):
        fit_bradley_terry(np.array([[0, 3.0], [0, 0]]), prior=0.0)
    assert np.isfinite(fit_bradley_terry(np.array([[0, 3.0], [0, 0]]), prior=0.1)).all()


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    spec = [("a", "b", int(v)) for v in rng.choice([1, 2, 3], 200, p=[0.6, 0.3, 0.1])]
    spec += [("b", "c", int(v)) for v in rng.choice([1, 2], 200, p=[0.7, 0.3])]
    spec += [("c", "a", int(v)) for v in rng.choice([1, 2], 100, p=[0.2, 0.8])]
    s = bradley_terry(_judgments(spec), ["a", "b", "c"], bootstrap=200, seed=0)
    assert (s.low <= s.theta).all() and (s.theta <= s.high).all()
    assert (s.high - s.low > 0.05).all() and (s.high - s.low < 1.5).all()
    assert s.theta[0] > s.theta[1] > s.theta[2]
    again = bradley_terry(_judgments(spec), ["a", "b", "c"], bootstrap=200, seed=0)
    np.testing.assert_array_equal(s.low, again.low)


def test_position_bias_by_hand():
    bias = position_bias(_judgments(SPEC))
    # Verdict 1 (shown first wins): 4 + 1 = 5; verdict 2: 2 + 1 = 3; ties 2; invalid 1.
    assert (bias["first_wins"], bias["second_wins"], bias["ties"], bias["invalid"]) == (5, 3, 2, 1)
    assert bias["first_win_rate"] == pytest.approx(62.5)
    # Two-sided exact binomial for 5 of 8: P(X <= 3) + P(X >= 5) = 2 * 93 / 256.
    assert bias["p_value"] == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)
    assert binomial_two_sided(4, 8) == pytest.approx(1.0)
    assert binomial_two_sided(0, 10) == pytest.approx(2 / 1024)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(23.65, abs=0.01) and hi == pytest.approx(76.34, abs=0.01)


class _ScriptedJudge:
    """Answers from a function of the prompt; records every prompt it was asked."""

    judge_id = "scripted"

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def answers(self, prompts, attempt=0):
        for i, p in enumerate(prompts):
            self.asked.append((attempt, p))
            yield i, self.answer(p, attempt)


def test_tournament_identical_replies_and_invalid_answers(tmp_path):
    histories = [PersonaTurn("d", ("p",), ("hi",), "")] * 2
    responses = {"x": ["same", "x-reply"], "y": ["same", "y-reply"]}
    plan = [Comparison(0, 0, "x", "y"), Comparison(1, 1, "x", "y"), Comparison(2, 1, "y", "x")]
    judge = _ScriptedJudge(lambda p, attempt: "no idea" if "y-reply\n" in p.split("[Assistant 2")[0]
                           else "[[1]]")
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        js = run_tournament(plan, histories, responses, judge, load_template("english"), cache,
                            parse_retries=1, progress=False)
    assert [j.verdict for j in js] == [3, 1, None]      # identical → tie; no verdict → invalid
    assert js[0].attempts == 0 and js[2].attempts == 2
    assert len(judge.asked) == 3                          # 1 + (1 + 1 retry), identical not asked
    assert [a for a, _ in judge.asked] == [0, 0, 1]
    with pytest.raises(ValueError, match="aligned"):
        run_tournament(plan, histories, {"x": ["a"], "y": ["b", "c"]}, judge,
                       load_template("english"), JudgmentCache(tmp_path / "d.sqlite"))
