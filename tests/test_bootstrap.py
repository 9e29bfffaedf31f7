"""The paired bootstrap of Dialogue-NLI differences against hand-computed cases."""
import json

import numpy as np
import pytest

from pdpo_jax.eval import bootstrap
from pdpo_jax.eval.dnli import (CATEGORIES, CandidateScore, DnliResult, dnli_report,
                                dnli_statistics, dnli_table, paired_differences)


def _result(outcomes):
    """One example per (group, winning category)."""
    scores = [CandidateScore(f"{g}/{i}", g, j, c, c, 0.0 if c == won else -1.0, 1)
              for i, (g, won) in enumerate(outcomes) for j, c in enumerate(CATEGORIES)]
    return DnliResult(scores, {f"{g}/{i}": "" for i, (g, _) in enumerate(outcomes)})


def test_resample_counts_are_draws_with_replacement():
    counts = bootstrap.resample_counts(7, 500, np.random.default_rng(0))
    assert counts.shape == (500, 7) and np.all(counts.sum(axis=1) == 7)
    rng = np.random.default_rng(0)
    first = np.bincount(rng.integers(7, size=7), minlength=7)  # resample 0, drawn by hand
    np.testing.assert_array_equal(counts[0], first)


def test_identical_checkpoints_differ_by_exactly_zero():
    one_hot = np.eye(4)[np.random.default_rng(1).integers(4, size=50)]
    for d in bootstrap.paired_share_differences(one_hot, one_hot):
        assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0)


def test_one_changed_example_follows_the_binomial():
    """n = 10 examples, the second model moves one from hits to contradict. A resample holds
    that example k ~ Binomial(10, 1/10) times, so Contradict's difference is 10k points:
    P(k = 0) = 0.349 > 2.5%, P(k <= 2) = 0.930 < 97.5% <= P(k <= 3) = 0.987 → [0, 30]."""
    first = np.eye(4)[[0] * 10]
    second = first.copy()
    second[3] = np.eye(4)[3]
    hits, entail, rand, contradict = bootstrap.paired_share_differences(first, second, seed=0)
    assert contradict.diff == pytest.approx(10.0)
    assert (contradict.low, contradict.high) == pytest.approx((0.0, 30.0))
    assert (hits.diff, hits.low, hits.high) == pytest.approx((-10.0, -30.0, 0.0))
    assert entail == rand == bootstrap.Difference(0.0, 0.0, 0.0)


def test_pairing_leaves_out_examples_both_models_agree_on():
    """Half the examples are contradictions for both models: an unpaired interval would be
    ±~14 points, the paired one is exactly 0."""
    outcomes = [("havenot", "contradict" if i % 2 else "hits") for i in range(40)]
    diffs = paired_differences({"sft": _result(outcomes), "dpo": _result(outcomes)})
    assert diffs["dpo"]["n"] == {"all": 40, "havenot": 40}
    assert all((d.low, d.high) == (0.0, 0.0) for d in diffs["dpo"]["all"])


def test_tables_report_and_summary_carry_n_and_intervals():
    base = [("attributes", "hits"), ("havenot", "contradict"), ("havenot", "hits")] * 4
    better = [(g, "entail" if c == "contradict" else c) for g, c in base]
    results = {"sft": _result(base), "dpo": _result(better)}
    table = dnli_table(results, "sum")
    # 4 of 12 examples move from contradict to entail in every resample that holds them
    assert "| Δ dpo − sft (95% CI) | +0.0 [+0.0, +0.0] | +33.3 [" in table
    assert table.splitlines()[-1].endswith("| 12 |")
    group = dnli_table(results, "mean", by_group=True)
    assert "| Δ dpo − sft (95% CI) | attributes | +0.0 [+0.0, +0.0] |" in group
    assert "| Δ dpo − sft (95% CI) | havenot | +0.0 [+0.0, +0.0] | +50.0 [" in group
    report = dnli_report(results)
    assert report.count("**Smoke signal:**") == 4  # overall and per group, both scorings
    stats = json.loads(json.dumps(dnli_statistics(results)))
    contradict = stats["scores"]["sum"]["differences"]["dpo"]["all"]["contradict"]
    assert contradict["diff"] == pytest.approx(-100 / 3) and contradict["high"] < 0
    assert stats["scores"]["mean"]["rank1"]["sft"]["all"]["n"] == 12
    assert stats["baseline"] == "sft" and stats["resamples"] == 10_000
