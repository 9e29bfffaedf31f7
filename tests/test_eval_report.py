"""Reports: PNG plots are written, markdown tables have the expected rows."""
import json

import pytest

from pdpo_jax.eval import (Comparison, DnliResult, Judgment, bradley_terry, head_to_head_table,
                           plot_dnli, plot_training_curves, plot_win_rates, tournament_report,
                           win_rate_table)
from pdpo_jax.eval.dnli import CandidateScore, dnli_report
from pdpo_jax.tables import markdown_table

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


def _dnli(winner_categories):
    """One example per entry, whose top-scoring candidate is in the given category."""
    scores = []
    for i, (group, cat) in enumerate(winner_categories):
        for j, c in enumerate(("hits", "entail", "random", "contradict")):
            scores.append(CandidateScore(f"{group}/{i}", group, j, c, f"cand {j}",
                                         -1.0 if c == cat else -5.0, 2))
    return DnliResult(scores, {f"{g}/{i}": "prompt" for i, (g, _) in enumerate(winner_categories)})


def _judgments():
    spec = [("sft", "dpo", 2)] * 6 + [("dpo", "sft", 3)] * 2 + [("sft", "rl", 1)] * 3 + \
           [("rl", "dpo", 2)] * 4 + [("dpo", "sft", None)]
    return [Judgment(Comparison(i, 0, a, b), v, "", 1) for i, (a, b, v) in enumerate(spec)]


def test_dnli_plot_and_tables(tmp_path):
    results = {"SFT": _dnli([("attributes", "hits"), ("havenot", "contradict")]),
               "+PseudoDPO": _dnli([("attributes", "hits"), ("havenot", "entail")])}
    assert _png(plot_dnli(results, tmp_path / "d.png"))
    md = dnli_report(results)
    assert "| SFT | 50.0 | 0.0 | 0.0 | 50.0 | 2 |" in md
    assert "| +PseudoDPO | 50.0 | 50.0 | 0.0 | 0.0 | 2 |" in md
    assert "| +PseudoDPO | havenot | 0.0 | 100.0 | 0.0 | 0.0 | 1 |" in md
    assert md.count("| SFT | 50.0 |") == 2 and md.count("| SFT | attributes |") == 2  # sum, mean


def test_tournament_tables_and_win_rate_plot(tmp_path):
    js, models = _judgments(), ["sft", "dpo", "rl"]
    strengths = bradley_terry(js, models, bootstrap=50)
    table = win_rate_table(js, models, strengths)
    lines = table.splitlines()
    assert lines[0].startswith("| Model | n | Win [%] | Draw [%] | Loss [%] | Invalid | BT θ")
    # dpo: wins 6 (vs sft) + 4 (vs rl) = 10, draws 2, losses 0, invalid 1 → 12 valid.
    assert lines[3].startswith("| dpo | 12 | 83.3 | 16.7 | 0.0 | 1 | +")
    assert lines[2].startswith("| sft | 11 | 27.3 | 18.2 | 54.5 | 1 |")
    h2h = head_to_head_table(js, models)
    assert "| sft vs dpo | 8 | 0.0 | 25.0 | 75.0 | 1 |" in h2h
    assert "| sft vs rl | 3 | 100.0 | 0.0 | 0.0 | 0 |" in h2h
    assert "| dpo vs rl | 4 | 100.0 | 0.0 | 0.0 | 0 |" in h2h
    md = tournament_report(js, models, strengths, "judge-x")
    assert "Position bias" in md and "`judge-x`" in md
    assert _png(plot_win_rates(js, models, tmp_path / "w.png"))


def test_training_curves_from_metrics_jsonl(tmp_path):
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    sft.write_text("\n".join(json.dumps({"step": s, "time": 0.0, "train/loss": 3 - s / 10,
                                         **({"eval/loss": 3.1 - s / 10} if s % 5 == 0 else {})})
                             for s in range(0, 30)))
    dpo.write_text("\n".join(json.dumps({"step": s, "train/loss": 0.69 - s / 100,
                                         "train/rewards/accuracies": 0.5 + s / 100,
                                         "eval/rewards/accuracies": float("nan") if s == 3 else 0.6})
                             for s in range(10)))
    assert _png(plot_training_curves(sft, tmp_path / "one.png"))
    assert _png(plot_training_curves({"sft": sft, "dpo": dpo}, tmp_path / "two.png"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_markdown_table_formats_cells():
    md = markdown_table(["a", "b"], [["x", 1.234], ["y", float("nan")]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x | 1.2 |", "| y | – |"]


def test_curves_command(tmp_path, capsys):
    from pdpo_jax.eval.__main__ import main
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n'
                                                   '{"step": 2, "train/loss": 1.5}\n')
    status = main(["curves", str(tmp_path / "sft" / "metrics.jsonl"), "--out", str(tmp_path / "c.png")])
    assert status == 0 and _png(tmp_path / "c.png")
    assert capsys.readouterr().out.strip().endswith("c.png")
