"""Evaluation: Dialogue-NLI consistency ranking and pairwise LLM-judge tournaments (paper §4.2–4.4).

    result = score_dnli(model, tokenizer, "english", read_dnli_files(default_paths().dnli))
    print(dnli_table({"sft": sft_result, "dpo": result}))          # Table 4 layout

    plan = plan_comparisons(["sft", "dpo"], len(histories), comparisons=200, seed=0)
    judgments = run_tournament(plan, histories, replies, backend, load_template("english"), cache)
    strengths = bradley_terry(judgments, ["sft", "dpo"])
    print(tournament_report(judgments, ["sft", "dpo"], strengths, backend.judge_id))

Pipeline entry points: `run_dnli_stage`, `run_judge_stage` (resumable, write into out_dir).
"""
import importlib

# name -> submodule; imported on first use (PEP 562), so that importing one light submodule
# (e.g. the config sections) does not pull in every dependency of the package.
_WHERE = {
    "JudgeBackend": "pdpo_jax.eval.backends",
    "JudgeError": "pdpo_jax.eval.backends",
    "LocalJudge": "pdpo_jax.eval.backends",
    "OpenAIBackend": "pdpo_jax.eval.backends",
    "JudgmentCache": "pdpo_jax.eval.cache",
    "judgment_key": "pdpo_jax.eval.cache",
    "EvalSection": "pdpo_jax.eval.config",
    "JudgeSection": "pdpo_jax.eval.config",
    "ResponseSection": "pdpo_jax.eval.config",
    "resolve_checkpoints": "pdpo_jax.eval.config",
    "CandidateScore": "pdpo_jax.eval.dnli",
    "DnliResult": "pdpo_jax.eval.dnli",
    "dnli_report": "pdpo_jax.eval.dnli",
    "dnli_table": "pdpo_jax.eval.dnli",
    "score_dnli": "pdpo_jax.eval.dnli",
    "select_examples": "pdpo_jax.eval.dnli",
    "JudgeTemplate": "pdpo_jax.eval.judge",
    "load_template": "pdpo_jax.eval.judge",
    "parse_verdict": "pdpo_jax.eval.judge",
    "Record": "pdpo_jax.eval.ratings",
    "Strengths": "pdpo_jax.eval.ratings",
    "bradley_terry": "pdpo_jax.eval.ratings",
    "fit_bradley_terry": "pdpo_jax.eval.ratings",
    "head_to_head": "pdpo_jax.eval.ratings",
    "position_bias": "pdpo_jax.eval.ratings",
    "records": "pdpo_jax.eval.ratings",
    "head_to_head_table": "pdpo_jax.eval.report",
    "markdown_table": "pdpo_jax.eval.report",
    "plot_dnli": "pdpo_jax.eval.report",
    "plot_training_curves": "pdpo_jax.eval.report",
    "plot_win_rates": "pdpo_jax.eval.report",
    "tournament_report": "pdpo_jax.eval.report",
    "win_rate_table": "pdpo_jax.eval.report",
    "generate_responses": "pdpo_jax.eval.responses",
    "responses_for_checkpoints": "pdpo_jax.eval.responses",
    "select_histories": "pdpo_jax.eval.responses",
    "make_backend": "pdpo_jax.eval.stages",
    "run_dnli_stage": "pdpo_jax.eval.stages",
    "run_judge_stage": "pdpo_jax.eval.stages",
    "Comparison": "pdpo_jax.eval.tournament",
    "Judgment": "pdpo_jax.eval.tournament",
    "plan_comparisons": "pdpo_jax.eval.tournament",
    "run_tournament": "pdpo_jax.eval.tournament",
}


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


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
