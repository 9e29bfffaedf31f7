"""The judge tournament's tables, in the paper's layouts: per-model win/draw/loss (Tables 1–2)
with Bradley–Terry strengths, head-to-head (Table 3), and the judge's position bias.
"""
from __future__ import annotations

from collections.abc import Sequence

from pdpo_jax.eval import ratings
from pdpo_jax.eval.tournament import Judgment
from pdpo_jax.tables import markdown_table


def win_rate_table(judgments: Sequence[Judgment], models: Sequence[str],
                   strengths: ratings.Strengths | None = None) -> str:
    """One row per model: comparisons, Win/Draw/Loss %, invalid, BT θ [interval]."""
    recs = ratings.records(judgments, models)
    headers = ["Model", "n", "Win [%]", "Draw [%]", "Loss [%]", "Invalid"]
    if strengths is not None:
        headers.append(f"BT θ [{strengths.level:.0%} CI]")
    rows = []
    for i, m in enumerate(models):
        row = [m, recs[m].n, *recs[m].rates(), recs[m].invalid]
        if strengths is not None:
            row.append(f"{strengths.theta[i]:+.2f} [{strengths.low[i]:+.2f}, {strengths.high[i]:+.2f}]")
        rows.append(row)
    return markdown_table(headers, rows)


def head_to_head_table(judgments: Sequence[Judgment], models: Sequence[str]) -> str:
    """Rows 'A vs B' with A's Win/Draw/Lose % against B (paper Table 3 layout)."""
    rows = [[f"{a} vs {b}", rec.n, *rec.rates(), rec.invalid]
            for (a, b), rec in ratings.head_to_head(judgments, models).items()]
    return markdown_table(["Pair (first's view)", "n", "Win [%]", "Draw [%]", "Lose [%]",
                           "Invalid"], rows)


def position_bias_table(judgments: Sequence[Judgment]) -> str:
    b = ratings.position_bias(judgments)
    return markdown_table(
        ["Valid", "Shown-first wins", "Shown-second wins", "Ties", "Invalid",
         "First-win rate of decisive [%]", "p (two-sided binomial)"],
        [[b["valid"], b["first_wins"], b["second_wins"], b["ties"], b["invalid"],
          b["first_win_rate"], f"{b['p_value']:.3g}"]])


def tournament_report(judgments: Sequence[Judgment], models: Sequence[str],
                      strengths: ratings.Strengths, judge_id: str) -> str:
    return "\n\n".join([
        "## Pairwise LLM-judge tournament",
        f"Judge `{judge_id}`; {len(judgments)} comparisons. Rates exclude invalid verdicts; "
        "BT θ: Bradley–Terry log-strength (ties = half wins), percentile bootstrap interval.",
        "### Per model (Tables 1–2 layout)", win_rate_table(judgments, models, strengths),
        "### Head to head (Table 3 layout)", head_to_head_table(judgments, models),
        "### Position bias", position_bias_table(judgments)]) + "\n"
