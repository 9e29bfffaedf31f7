"""The human-evaluation report: report.md, summary.json, table3.png and annotators.png.

    write_report("annotations.sqlite", "runs/x/eval/judge")   # -> runs/x/eval/judge/humaneval/

Reads the judgments from the study's SQLite file and the judge's verdicts from the judge folder
(the pairs the study was served from), and writes what `analysis.analyse` computes: the paper's
Table 3 rows (human majority, LLM judge), agreement and κ, position bias, per-annotator rates.
"""
from __future__ import annotations

import math
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from pdpo_jax.figures import save_figure
from pdpo_jax.fileio import write_json_atomic, write_text_atomic
from pdpo_jax.humaneval.analysis import OUTCOMES, Estimate, analyse, collect
from pdpo_jax.humaneval.pairs import load_pairs, pairs_file
from pdpo_jax.humaneval.store import StoreError, read_judgments
from pdpo_jax.tables import cell, markdown_table

MAJORITY_RULE = ("Human (majority): per pair, the outcome most of its annotators chose; when two "
                 "or more outcomes share the highest count (1 win / 1 loss, or one of each) the "
                 "pair counts as a draw.")


def write_report(db: str | os.PathLike, judge: str | os.PathLike, *,
                 out: str | os.PathLike | None = None, a: str | None = None, b: str | None = None,
                 bootstrap: int = 1000, seed: int = 0) -> pathlib.Path:
    """Writes the report into `out` (default: <judge folder>/humaneval); returns report.md."""
    source = pairs_file(judge)
    pairs = {p.id: p for p in load_pairs(source)}
    rows = read_judgments(db)
    if not rows:
        raise StoreError(f"{db}: no judgments yet; annotate first (python -m pdpo_jax.humaneval serve)")
    result = analyse(collect(rows, pairs, a, b), bootstrap, seed)
    out = pathlib.Path(out) if out is not None else source.parent / "humaneval"
    plot_table3(result, out / "table3.png")
    plot_annotators(result, out / "annotators.png")
    write_json_atomic(out / "summary.json", _jsonable(result))
    return write_text_atomic(out / "report.md", markdown(result, db, source, bootstrap, seed))


def _ci(e: Estimate, digits: int = 1) -> str:
    if math.isnan(e.value):
        return "–"
    interval = "" if math.isnan(e.low) else f" [{e.low:.{digits}f}, {e.high:.{digits}f}]"
    return f"{e.value:.{digits}f}{interval}"


def markdown(result: dict, db, source, bootstrap: int, seed: int) -> str:
    a, b, pairs = result["a"], result["b"], result["pairs"]
    raters = ", ".join(f"{k} × {v}" for k, v in result["raters"].items())
    head = [f"# Human evaluation: {a} vs {b}",
            (f"Annotations `{db}`, judge verdicts `{source}`. {pairs} pairs judged by "
             f"{result['annotators']} annotators ({result['judgments']} judgments, "
             f"{result['judgments'] / max(pairs, 1):.1f} per pair; annotators per pair: {raters}); "
             f"the judge's verdict is valid on {result['judge_valid']} of them. Rates are % of "
             f"pairs with a percentile bootstrap 95% interval ({bootstrap} resamples of the pairs, "
             f"seed {seed}); invalid judge verdicts are left out of the judge's statistics.")]
    return "\n\n".join(head + _table3(result) + _agreement(result) + _position(result)
                       + _annotators(result)) + "\n"


def _table3(result: dict) -> list[str]:
    rows = [[name, est[0].n, *map(_ci, est)] for name, est in (
        ("Human (majority)", result["table3"]["human"]), ("LLM judge", result["table3"]["judge"]))]
    return [f"## Table 3: {result['a']} against {result['b']}",
            markdown_table(["Evaluator", "Pairs", "Win [%]", "Draw [%]", "Loss [%]"], rows),
            MAJORITY_RULE, "![Table 3](table3.png)"]


def _agreement(result: dict) -> list[str]:
    agree, fleiss = result["agreement"], result["fleiss_kappa"]
    rows = [[text, e.n, _ci(e, digits)] for text, e, digits in (
        ("Agreement, draws included [%]", agree["with_draws"], 1),
        ("Agreement, pairs where neither said draw [%] (paper: 78)", agree["without_draws"], 1),
        ("Agreement per annotation, neither a draw [%] (n: annotations)",
         agree["annotations_without_draws"], 1),
        ("Cohen's κ, human majority vs judge (3 outcomes)", agree["cohen_kappa"], 3),
        ("Fleiss' κ among annotators (pairs with ≥ 2)", fleiss, 3))]
    confusion = [[f"human {o}", *result["confusion"][i]] for i, o in enumerate(OUTCOMES)]
    return ["## Agreement of the human majority with the judge",
            markdown_table(["Measure", "n", "Value [95% CI]"], rows),
            ("Fleiss' κ is generalised to pairs with different numbers of annotators (each pair's "
             "agreement P_i uses its own count n_i; category shares pool all annotations); it is "
             "Fleiss' κ when all pairs have the same number. Cohen's κ and agreement use pairs "
             "with a valid judge verdict."),
            markdown_table(["Pairs", *(f"judge {o}" for o in OUTCOMES)], confusion)]


def _position(result: dict) -> list[str]:
    bias = result["position_bias"]
    low, high = bias["wilson"]
    row = [bias["decisive"], bias["chose_1"], _ci(bias["share"]), f"[{cell(low)}, {cell(high)}]",
           f"{bias['p_value']:.3g}"]
    return ["## Position bias of the annotators",
            ("Share of decisive answers (not tie) that chose the reply shown as 1; each annotator "
             "saw each pair in its own random order. p: exact two-sided binomial test of 50%."),
            markdown_table(["Decisive answers", "Chose 1", "Share [%] (bootstrap)", "Wilson 95%",
                            "p"], [row])]


def _annotators(result: dict) -> list[str]:
    rows = [[s["annotator"], s["n"], _ci(s["win"]), _ci(s["draw"]), _ci(s["agree_others"]),
             _ci(s["agree_judge"])] for s in result["annotators_stats"]]
    return ["## Per annotator",
            (f"A = {result['a']}. Agreement with the others: with the majority (same rule) of the "
             "other annotators of the same pair, over pairs someone else judged too; with the "
             "judge: over pairs with a valid verdict. Intervals resample the annotator's pairs."),
            markdown_table(["Annotator", "n", "A wins [%]", "Draws [%]",
                            "Agrees with others [%]", "Agrees with judge [%]"], rows),
            "![Per-annotator agreement](annotators.png)"]


def _bars(ax, xs, estimates: list[Estimate], width: float, label: str):
    values = [e.value for e in estimates]
    err = [[max(e.value - e.low, 0) if not math.isnan(e.low) else 0 for e in estimates],
           [max(e.high - e.value, 0) if not math.isnan(e.high) else 0 for e in estimates]]
    bars = ax.bar(xs, values, width, yerr=err, capsize=3, label=label)
    ax.bar_label(bars, fmt="%.1f", fontsize=7, label_type="center")


def plot_table3(result: dict, path: str | os.PathLike) -> pathlib.Path:
    """Win/draw/loss bars of A against B, human majority and judge, with 95% intervals."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = np.arange(3)
    _bars(ax, xs - 0.2, result["table3"]["human"], 0.4, "Human (majority)")
    _bars(ax, xs + 0.2, result["table3"]["judge"], 0.4, "LLM judge")
    ax.set_xticks(xs, OUTCOMES)
    ax.set_ylabel("% of pairs")
    ax.set_ylim(0, 105)
    ax.set_title(f"{result['a']} against {result['b']} ({result['pairs']} pairs)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_annotators(result: dict, path: str | os.PathLike) -> pathlib.Path:
    """Per-annotator agreement with the others' majority and with the judge (95% intervals)."""
    stats = result["annotators_stats"]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(stats) + 2), 3.6))
    xs = np.arange(len(stats))
    _bars(ax, xs - 0.2, [s["agree_others"] for s in stats], 0.4, "with the others' majority")
    _bars(ax, xs + 0.2, [s["agree_judge"] for s in stats], 0.4, "with the LLM judge")
    ax.set_xticks(xs, [f"{s['annotator']}\n(n={s['n']})" for s in stats], fontsize=8)
    ax.set_ylabel("% agreement")
    ax.set_ylim(0, 105)
    ax.set_title("Agreement per annotator (3 outcomes)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _jsonable(x):
    if isinstance(x, Estimate):
        return {"value": _num(x.value), "low": _num(x.low), "high": _num(x.high), "n": x.n}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return _num(x) if isinstance(x, float) else x


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
