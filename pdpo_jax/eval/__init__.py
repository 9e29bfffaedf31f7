"""Evaluation: Dialogue-NLI consistency ranking and pairwise LLM-judge tournaments (paper §4.2–4.4).

    result = score_dnli(model, tokenizer, "english", read_dnli_files(default_paths().dnli))
    print(dnli_table({"sft": sft_result, "dpo": result}))          # Table 4 layout

    plan = plan_comparisons(["sft", "dpo"], len(histories), comparisons=200, seed=0)
    judgments = run_tournament(plan, histories, replies, backend, load_template("english"), cache)
    strengths = bradley_terry(judgments, ["sft", "dpo"])
    print(tournament_report(judgments, ["sft", "dpo"], strengths, backend.judge_id))

Pipeline entry points: `run_dnli_stage`, `run_judge_stage` (resumable, write into out_dir).
"""
from pdpo_jax._lazy import lazy_exports

# Each name imports its submodule on first use (see pdpo_jax._lazy).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".backends": ("JudgeBackend", "JudgeError", "LocalJudge", "OpenAIBackend"),
    ".cache": ("JudgmentCache", "judgment_key"),
    ".checkpoints": ("resolve_checkpoints",),
    ".dnli": ("CandidateScore", "DnliResult", "dnli_report", "dnli_table", "select_examples"),
    ".dnli_scoring": ("score_dnli",),
    ".judge": ("JudgeTemplate", "load_template", "parse_verdict"),
    ".ratings": ("Record", "Strengths", "bradley_terry", "fit_bradley_terry", "head_to_head",
        "position_bias", "records"),
    ".judge_report": ("head_to_head_table", "position_bias_table", "tournament_report",
        "win_rate_table"),
    ".plots": ("plot_dnli", "plot_training_curves", "plot_win_rates"),
    ".responses": ("generate_responses", "responses_for_checkpoints", "select_histories"),
    ".stages": ("make_backend", "run_dnli_stage", "run_judge_stage"),
    ".tournament": ("Comparison", "Judgment", "plan_comparisons", "run_tournament"),
})
