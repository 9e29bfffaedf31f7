"""Evaluation stages the pipeline calls: DNLI ranking and the judge tournament.

Both write into `out_dir` and skip what is already there (resumable):
  <out_dir>/dnli/<label>.jsonl        per-candidate scores (+ .meta.json: written last = complete)
  <out_dir>/dnli/report.md, summary.json (shares, paired bootstrap differences), dnli_<sum|mean>.png
  <out_dir>/judge/responses/<label>.jsonl   replies with their sampling settings (+ .meta.json)
  <out_dir>/judge/judgments.sqlite    the judgment cache (unless judge.cache names another file)
  <out_dir>/judge/comparisons.jsonl, report.md, win_rates.png, summary.json
"""
from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence

from pdpo_jax import data as pdata
from pdpo_jax.eval import judge_report, plots, ratings
from pdpo_jax.eval.backends import JudgeBackend, JudgeError, LocalJudge, OpenAIBackend
from pdpo_jax.eval.cache import JudgmentCache
from pdpo_jax.config import EvalSection, JudgeSection, ResponseSection
from pdpo_jax.context import RunContext, read_dialogues
from pdpo_jax.eval.checkpoints import resolve_checkpoints
from pdpo_jax.eval.dnli import (DnliResult, all_differences, dnli_report, dnli_statistics,
                                select_examples)
from pdpo_jax.eval.dnli_scoring import score_dnli
from pdpo_jax.fileio import (checkpoint_fingerprint, read_json, read_jsonl, text_hash,
                              write_json_atomic, write_jsonl_atomic, write_text_atomic)
from pdpo_jax.eval.judge import load_template
from pdpo_jax.eval.responses import responses_for_checkpoints, select_histories
from pdpo_jax.eval.tournament import plan_comparisons, run_tournament

log = logging.getLogger(__name__)


def load_dnli_examples(cfg: EvalSection) -> list[pdata.DnliExample]:
    files = cfg.dnli_files or pdata.default_paths().dnli
    return select_examples(pdata.read_dnli_files(files), cfg.max_examples)


def run_dnli_stage(out_dir: str | os.PathLike, checkpoints: dict[str, str | os.PathLike],
                   tokenizer, eval_cfg: EvalSection, template, mesh=None) -> str:
    """Scores every checkpoint on the DNLI examples; returns (and writes) the markdown report."""
    from pdpo_jax.models import from_pretrained
    out = pathlib.Path(out_dir) / "dnli"
    examples = load_dnli_examples(eval_cfg)
    examples_id = text_hash(*(repr((e.example_id, e.persona, e.history, e.candidates))
                              for e in examples))[:16]
    results: dict[str, DnliResult] = {}
    for label, folder in checkpoints.items():
        meta = {"checkpoint": str(folder), "fingerprint": checkpoint_fingerprint(folder),
                "examples": examples_id, "template": getattr(template, "name", template),
                "max_prompt_tokens": eval_cfg.max_prompt_tokens}
        path, meta_path = out / f"{label}.jsonl", out / f"{label}.meta.json"
        if read_json(meta_path) == meta and path.is_file():
            log.info("DNLI %s: reusing %s", label, path)
            results[label] = DnliResult.from_rows(read_jsonl(path))
            continue
        model = from_pretrained(folder, mesh=mesh)
        results[label] = score_dnli(model, tokenizer, template, examples,
                                    batch_size=eval_cfg.batch_size,
                                    max_prompt_tokens=eval_cfg.max_prompt_tokens, mesh=mesh,
                                    layout=eval_cfg.dnli_layout)
        del model
        write_jsonl_atomic(path, results[label].to_rows())
        write_json_atomic(meta_path, meta)  # last: its presence means the JSONL is complete
    differences = all_differences(results, eval_cfg.normalisations)
    markdown = dnli_report(results, eval_cfg.normalisations, differences)
    write_text_atomic(out / "report.md", markdown)
    write_json_atomic(out / "summary.json",
                      dnli_statistics(results, eval_cfg.normalisations, differences), indent=2)
    for norm in eval_cfg.normalisations:
        plots.plot_dnli(results, out / f"dnli_{norm}.png", norm)
    return markdown


def check_judge_settings(cfg: JudgeSection) -> None:
    """Fails fast (before any reply is generated) on settings the judge cannot work with."""
    load_template(cfg.template)
    if cfg.backend == "openai" and not os.environ.get(cfg.api_key_env):
        raise JudgeError(f"judge.backend='openai' reads its API key from ${cfg.api_key_env}, "
                         "which is not set; export it (the key is never logged or written) or "
                         "point judge.api_key_env at the variable that holds it")
    if cfg.backend == "local" and not (pathlib.Path(cfg.local_checkpoint).expanduser() / "config.json").is_file():
        raise JudgeError(f"judge.backend='local' needs judge.local_checkpoint to be an HF "
                         f"checkpoint folder; got {cfg.local_checkpoint!r}")


def make_backend(cfg: JudgeSection, mesh=None) -> JudgeBackend:
    """The judge `cfg` describes; the OpenAI key and URL come from the environment."""
    check_judge_settings(cfg)
    if cfg.backend == "local":
        return LocalJudge(cfg.local_checkpoint, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.concurrency, mesh=mesh)
    return OpenAIBackend(cfg.model, cfg.base_url, os.environ[cfg.api_key_env],
                         concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                         max_retries=cfg.max_retries, max_tokens=cfg.max_new_tokens,
                         api_key_env=cfg.api_key_env)


def run_judge_stage(out_dir: str | os.PathLike, checkpoints: dict[str, str | os.PathLike],
                    tokenizer, histories: Sequence[pdata.PersonaTurn], judge_cfg: JudgeSection,
                    responses_cfg: ResponseSection = ResponseSection(), *, template="english",
                    mesh=None, backend: JudgeBackend | None = None) -> str:
    """Replies of every checkpoint to sampled test histories, then the judged tournament.

    histories: candidate test records (e.g. `read_turns(default_paths().dev)`);
    `responses_cfg.num_histories` of them are drawn (seeded). template: the prompt template the
    checkpoints were trained with. backend: overrides the one `judge_cfg` describes.
    Returns (and writes) the markdown report.
    """
    out = pathlib.Path(out_dir) / "judge"
    judge_template = load_template(judge_cfg.template)
    if backend is None:
        check_judge_settings(judge_cfg)
    picked = select_histories(histories, responses_cfg.num_histories, responses_cfg.seed)
    replies = responses_for_checkpoints(out / "responses", {k: pathlib.Path(v) for k, v in
                                                            checkpoints.items()},
                                        tokenizer, template, picked, responses_cfg, mesh=mesh)
    backend = backend or make_backend(judge_cfg, mesh)
    models = list(checkpoints)
    plan = plan_comparisons(models, len(picked), judge_cfg.comparisons, judge_cfg.seed)
    with JudgmentCache(judge_cfg.cache or out / "judgments.sqlite") as cache:
        judgments = run_tournament(plan, picked, replies, backend, judge_template, cache,
                                   parse_retries=judge_cfg.parse_retries)
    write_jsonl_atomic(out / "comparisons.jsonl", [
        comparison_row(j, picked[j.comparison.history], replies) for j in judgments])
    strengths = ratings.bradley_terry(judgments, models, bootstrap=judge_cfg.bootstrap,
                                      seed=judge_cfg.seed)
    markdown = judge_report.tournament_report(judgments, models, strengths, backend.judge_id)
    write_text_atomic(out / "report.md", markdown)
    plots.plot_win_rates(judgments, models, out / "win_rates.png")
    write_json_atomic(out / "summary.json", _summary(judgments, models, strengths, backend))
    return markdown


def comparison_row(judgment, history: pdata.PersonaTurn, replies: dict[str, list[str]]) -> dict:
    """One line of comparisons.jsonl: the judgment and everything it was shown (persona,
    dialogue history, both replies in the order shown), so the file alone holds the pair (the
    human evaluation reads it)."""
    c = judgment.comparison
    return {**judgment.to_row(), "record_id": history.record_id, "persona": list(history.persona),
            "dialogue": list(history.history), "response_first": replies[c.first][c.history],
            "response_second": replies[c.second][c.history]}


def _summary(judgments, models, strengths: ratings.Strengths, backend) -> dict:
    recs = ratings.records(judgments, models)
    return {"judge": backend.judge_id, "comparisons": len(judgments),
            "position_bias": ratings.position_bias(judgments),
            "models": {m: {"wins": recs[m].wins, "draws": recs[m].draws,
                           "losses": recs[m].losses, "invalid": recs[m].invalid,
                           "bt_theta": float(strengths.theta[i]),
                           "bt_interval": [float(strengths.low[i]), float(strengths.high[i])]}
                       for i, m in enumerate(models)}}


# --------------------------------------------------------------------------------------------
# The pipeline stages


def run_eval(ctx: RunContext) -> None:
    """The `eval` stage: Dialogue-NLI ranking of `eval.checkpoints` into <run>/eval/dnli/."""
    checkpoints = resolve_checkpoints(ctx.cfg.eval.checkpoints, ctx.run_dir)
    markdown = run_dnli_stage(ctx.stage_dir("eval"), checkpoints, ctx.tokenizer, ctx.cfg.eval,
                              ctx.cfg.data.template, mesh=ctx.mesh)
    log.info("Dialogue-NLI:\n%s", markdown)


def run_judge(ctx: RunContext) -> None:
    """The `judge` stage: the pairwise tournament of `eval.checkpoints` on dev histories."""
    cfg = ctx.cfg
    checkpoints = resolve_checkpoints(cfg.eval.checkpoints, ctx.run_dir)
    histories = read_dialogues(cfg.data.dev or pdata.default_paths().dev, key="data.dev")
    markdown = run_judge_stage(ctx.stage_dir("eval"), checkpoints, ctx.tokenizer, histories,
                               cfg.eval.judge, cfg.eval.responses, template=cfg.data.template,
                               mesh=ctx.mesh)
    log.info("judge:\n%s", markdown)
