"""The human-evaluation statistics against values derived by hand here, and the report files."""
import itertools
import json
import math

import numpy as np
import pytest
from humaneval_data import MODEL_A, MODEL_B, pair_row, write_judge_folder

from pdpo_jax.humaneval import analysis
from pdpo_jax.humaneval.analysis import DRAW, LOSS, NONE, WIN, bootstrap, cohen_kappa, fleiss_kappa, majority
from pdpo_jax.humaneval.pairs import load_pairs
from pdpo_jax.humaneval.store import Store


def test_cohen_kappa_of_a_3x3_table():
    table = np.array([[10, 2, 3],
                      [1, 4, 1],
                      [2, 1, 6]])
    n = 30
    p_o = (10 + 4 + 6) / n                                   # the diagonal
    rows, cols = [15, 6, 9], [13, 7, 10]
    p_e = sum(r * c for r, c in zip(rows, cols)) / n**2      # (195 + 42 + 90) / 900
    assert p_e == pytest.approx(327 / 900)
    assert cohen_kappa(table) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert cohen_kappa(table) == pytest.approx(273 / 573)
    assert cohen_kappa(np.diag([3, 4, 5])) == pytest.approx(1.0)
    assert cohen_kappa(np.stack([table, np.diag([3, 4, 5])])) == pytest.approx([273 / 573, 1.0])


def test_fleiss_kappa_equal_and_unequal_raters():
    counts = np.array([[3, 0, 0],   # P_i = (3·2) / (3·2) = 1
                       [1, 1, 1],   # 0
                       [2, 1, 0],   # 2 / 6
                       [0, 2, 1]])  # 2 / 6
    p_bar = (1 + 0 + 1 / 3 + 1 / 3) / 4                          # 5/12
    p_j = np.array([6, 4, 2]) / 12
    p_e = (p_j**2).sum()                                         # 7/18
    assert fleiss_kappa(counts)[0] == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert fleiss_kappa(counts)[0] == pytest.approx(1 / 22)
    # a pair with 2 raters joins with its own n_i; a pair with 1 rater is left out
    unequal = np.vstack([counts, [2, 0, 0], [0, 1, 0]])
    p_bar = (1 + 0 + 1 / 3 + 1 / 3 + 1) / 5                      # 8/15
    p_e = ((np.array([8, 4, 2]) / 14) ** 2).sum()                # 3/7
    assert fleiss_kappa(unequal)[0] == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert fleiss_kappa(unequal)[0] == pytest.approx(11 / 60)


@pytest.mark.parametrize("labels,expected", [
    ([WIN, WIN, LOSS], WIN), ([WIN, LOSS], DRAW), ([WIN, DRAW, LOSS], DRAW),
    ([DRAW, DRAW, WIN], DRAW), ([LOSS], LOSS), ([WIN, WIN, DRAW, DRAW], DRAW),
    ([LOSS, LOSS, WIN, WIN, DRAW], DRAW), ([LOSS, LOSS, WIN], LOSS),
])
def test_majority_rule(labels, expected):
    assert majority(labels) == expected


_ASSIGNMENT = itertools.count(1)


def _row(annotator, pair, winner, swapped=False):
    """An exported judgment: `winner` is MODEL_A, MODEL_B or 'tie'."""
    shown = (MODEL_B, MODEL_A) if swapped else (MODEL_A, MODEL_B)
    choice = "tie" if winner == "tie" else ("1" if winner == shown[0] else "2")
    return {"annotator": annotator, "pair": pair, "shown_1": shown[0], "shown_2": shown[1],
            "choice": choice, "winner": winner, "assignment": next(_ASSIGNMENT)}


A, B, T = MODEL_A, MODEL_B, "tie"
# pair: judge verdict (MODEL_A is shown to the judge first) and the human judgments
STUDY = {0: (1, [("ann", A), ("bob", A), ("cyd", B)]),              # majority WIN, judge WIN
         1: (2, [("ann", A, True), ("bob", A, True)]),              # WIN vs LOSS
         2: (3, [("ann", A)]),                                      # WIN vs DRAW
         3: (1, [("ann", T), ("bob", T), ("cyd", A)]),              # DRAW vs WIN
         4: (None, [("bob", B, True)])}                             # LOSS vs invalid


@pytest.fixture
def votes(tmp_path):
    pairs = load_pairs(write_judge_folder(tmp_path, [pair_row(i, verdict=v) for i, (v, _) in STUDY.items()]))
    rows = [_row(j[0], i, *j[1:]) for i, (_, js) in STUDY.items() for j in js]
    return analysis.collect(rows, {p.id: p for p in pairs})


def test_collect_orients_outcomes_to_model_a(votes):
    assert (votes.a, votes.b) == (MODEL_A, MODEL_B)
    assert votes.human.tolist() == [WIN, WIN, WIN, DRAW, LOSS]
    assert votes.judge.tolist() == [WIN, LOSS, DRAW, WIN, NONE]


def test_table3_agreement_and_kappa_by_hand(votes):
    t3 = analysis.table3(votes, reps=200)
    assert [e.value for e in t3["human"]] == pytest.approx([60, 20, 20])   # 3, 1, 1 of 5
    assert [e.value for e in t3["judge"]] == pytest.approx([50, 25, 25])   # 2, 1, 1 of 4 valid
    agree = analysis.agreement(votes, reps=200)
    assert agree["with_draws"].value == pytest.approx(100 / 4)       # pair 0 of pairs 0-3
    assert agree["without_draws"].value == pytest.approx(100 / 2)    # pairs 0, 1: neither a draw
    assert agree["without_draws"].n == 2
    # each annotation vs the judge, neither a draw: pair 0: A ✓ A ✓ B ✗, pair 1: ✗ ✗, pair 3: A ✓
    assert agree["annotations_without_draws"].value == pytest.approx(100 * 3 / 6)
    # (human, judge) on valid pairs: (W,W) (W,L) (W,D) (D,W): p_o = 1/4, p_e = (3·2 + 1·1)/16
    p_o, p_e = 1 / 4, 7 / 16
    assert agree["cohen_kappa"].value == pytest.approx((p_o - p_e) / (1 - p_e))
    assert analysis.confusion(votes).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_fleiss_position_bias_and_annotators_by_hand(votes):
    kappa, raters = analysis.fleiss(votes, reps=200)
    # pairs with ≥ 2: [2,0,1] P=1/3, [2,0,0] P=1, [1,2,0] P=1/3; shares [5,2,1]/8
    p_bar, p_e = (1 / 3 + 1 + 1 / 3) / 3, (25 + 4 + 1) / 64
    assert kappa.value == pytest.approx((p_bar - p_e) / (1 - p_e)) and kappa.n == 3
    assert raters == {1: 2, 2: 1, 3: 2}
    bias = analysis.position_bias(votes, reps=200)
    assert (bias["decisive"], bias["chose_1"]) == (8, 5)
    assert bias["share"].value == pytest.approx(62.5)
    assert bias["p_value"] == pytest.approx(1 - math.comb(8, 4) / 2**8)  # all but k = 4
    ann = next(s for s in analysis.annotator_stats(votes, reps=200) if s["annotator"] == "ann")
    assert ann["n"] == 4 and ann["win"].value == 75 and ann["draw"].value == 25
    # others' majority: pair 0 (bob W, cyd L) = DRAW ✗, pair 1 (bob W) ✓, pair 3 (D, W) = DRAW ✓
    assert ann["agree_others"].value == pytest.approx(100 * 2 / 3) and ann["agree_others"].n == 3
    assert ann["agree_judge"].value == pytest.approx(25)  # only pair 0


def test_bootstrap_contains_the_estimate_and_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(1)
    hits = (rng.random(100) < 0.3).astype(float)

    def rate(h):
        return bootstrap(lambda w: 100 * (w @ h) / w.sum(axis=1), len(h), reps=2000, seed=7)

    small, big = rate(hits), rate(np.tile(hits, 4))
    assert small.low < small.value < small.high and small.value == pytest.approx(100 * hits.mean())
    assert big.value == pytest.approx(small.value)
    ratio = (big.high - big.low) / (small.high - small.low)
    assert 0.4 < ratio < 0.6  # 4x the pairs: half the width
    assert rate(hits) == small  # seeded
    empty = bootstrap(lambda w: w.sum(axis=1), 0)
    assert math.isnan(empty.value) and math.isnan(empty.low)


def test_collect_refuses_foreign_judgments_and_ambiguous_models(tmp_path):
    rows = [pair_row(0), pair_row(1, first="model-gamma", second=MODEL_B)]
    pairs = {p.id: p for p in load_pairs(write_judge_folder(tmp_path, rows))}
    with pytest.raises(ValueError, match="does not match the judge's pairs"):
        analysis.collect([_row("ann", 7, A)], pairs)
    judged = [_row("ann", 0, A), {**_row("ann", 1, B), "shown_1": "model-gamma"}]
    with pytest.raises(ValueError, match="compare 2 model pairs .* pick one with --a and --b"):
        analysis.collect(judged, pairs)
    votes = analysis.collect(judged, pairs, MODEL_B, MODEL_A)
    assert (votes.a, votes.pair_ids.tolist(), votes.human.tolist()) == (MODEL_B, [0], [LOSS])


def test_report_files_from_a_study_database(tmp_path):
    from pdpo_jax.humaneval.__main__ import main

    verdicts = [1, 1, 2, 3]  # the judge: A wins 2 of 4, loses 1, 1 draw
    judge = write_judge_folder(tmp_path / "judge", [pair_row(i, verdict=v) for i, v in enumerate(verdicts)])
    store = Store(tmp_path / "a.sqlite", load_pairs(judge), per_pair=2)
    for name in ("ann", "bob"):
        who = store.sign_in(name=name)[0]
        while (a := store.current(who)) is not None:  # everyone prefers MODEL_A
            store.submit(who, a.id, 2 if a.swapped else 1)
    assert main(["report", "--db", str(tmp_path / "a.sqlite"), "--judge", str(judge),
                 "--bootstrap", "100"]) == 0
    out = judge / "humaneval"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Human (majority) | 4 | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] |" in report
    assert "| LLM judge | 4 | 50.0 [" in report and "| 25.0 [" in report
    assert "Agreement, pairs where neither said draw [%] (paper: 78) | 3 | 66.7 [" in report
    for png in ("table3.png", "annotators.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table3"]["human"][0]["value"] == 100.0 and summary["judgments"] == 8
    assert summary["fleiss_kappa"]["value"] is None  # no disagreement: p_e = 1, κ undefined
