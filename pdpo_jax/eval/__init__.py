"""Evaluation: Dialogue-NLI consistency ranking and pairwise LLM-judge tournaments (paper §4.2–4.4).

    result = score_dnli(model, tokenizer, "english", read_dnli_files(default_paths().dnli))
    print(dnli_table({"sft": sft_result, "dpo": result}))          # Table 4 layout

    plan = plan_comparisons(["sft", "dpo"], len(histories), comparisons=200, seed=0)
    judgments = run_tournament(plan, histories, replies, backend, load_template("english"), cache)
    strengths = bradley_terry(judgments, ["sft", "dpo"])
    print(tournament_report(judgments, ["sft", "dpo"], strengths, backend.judge_id))

Pipeline entry points: `run_dnli_stage`, `run_judge_stage` (resumable, write into out_dir).
"""
from pdpo_jax.eval.backends import JudgeBackend, JudgeError, LocalJudge, OpenAIBackend
from pdpo_jax.eval.cache import JudgmentCache, judgment_key
from pdpo_jax.eval.config import EvalSection, JudgeSection, ResponseSection, resolve_checkpoints
from pdpo_jax.eval.dnli import (CandidateScore, DnliResult, dnli_report, dnli_table, score_dnli,
                                select_examples)
from pdpo_jax.eval.judge import JudgeTemplate, load_template, parse_verdict
from pdpo_jax.eval.ratings import (Record, Strengths, bradley_terry, fit_bradley_terry,
                                   head_to_head, position_bias, records)
from pdpo_jax.eval.report import (head_to_head_table, markdown_table, plot_dnli,
                                  plot_training_curves, plot_win_rates, tournament_report,
                                  win_rate_table)
from pdpo_jax.eval.responses import generate_responses, responses_for_checkpoints, select_histories
from pdpo_jax.eval.stages import make_backend, run_dnli_stage, run_judge_stage
from pdpo_jax.eval.tournament import Comparison, Judgment, plan_comparisons, run_tournament

__all__ = [
    "CandidateScore", "Comparison", "DnliResult", "EvalSection", "JudgeBackend", "JudgeError",
    "JudgeSection", "JudgeTemplate", "Judgment", "JudgmentCache", "LocalJudge", "OpenAIBackend",
    "Record", "ResponseSection", "Strengths", "bradley_terry", "dnli_report", "dnli_table",
    "fit_bradley_terry", "generate_responses", "head_to_head", "head_to_head_table",
    "judgment_key", "load_template", "make_backend", "markdown_table", "parse_verdict",
    "plan_comparisons", "plot_dnli", "plot_training_curves", "plot_win_rates", "position_bias",
    "records", "resolve_checkpoints", "responses_for_checkpoints", "run_dnli_stage",
    "run_judge_stage", "run_tournament", "score_dnli", "select_examples", "select_histories",
    "tournament_report", "win_rate_table",
]
