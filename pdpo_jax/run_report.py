"""The run's human report: `<out_dir>/report.md` with its plots in `<out_dir>/report/`.

It gathers what the stages wrote — the Dialogue-NLI table, the judge tournament, each stage's
prompt counts (kept, dropped, truncated), the SFT, DPO, reward-model and PPO curves,
chosen-vs-rejected length statistics and persona margins of the pseudo-preference data — and
adds a few side-by-side replies of the SFT and PseudoDPO models (like the paper's Table 5).
"""
from __future__ import annotations

import json
import logging
import pathlib

from pdpo_jax import data as pdata
from pdpo_jax.eval import plot_training_curves
from pdpo_jax.config import ResponseSection
from pdpo_jax.eval.checkpoints import resolve_checkpoints
from pdpo_jax.context import RunContext, read_dialogues
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_text_atomic
from pdpo_jax.tables import markdown_table
from pdpo_jax.eval.responses import responses_for_checkpoints, select_histories

log = logging.getLogger(__name__)

CURVES = {  # stage: (title, metrics drawn)
    "sft": ("SFT", ("train/loss", "eval/loss", "train/learning_rate", "train/grad_norm")),
    "dpo": ("DPO", ("train/loss", "eval/loss", "train/rewards/accuracies", "eval/rewards/accuracies",
                    "train/rewards/margins", "eval/rewards/margins")),
    "reward": ("NLI reward model", ("train/loss", "eval/loss", "eval/accuracy")),
    "rl": ("RL (PPO)", ("train/objective/scores", "eval/scores", "train/objective/kl",
                        "train/policy/approxkl", "train/policy/clipfrac", "train/val/vf_loss"))}


def _curves(run_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
    lines = []
    for stage, (title, keys) in CURVES.items():
        metrics = run_dir / stage / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        picked = out / f"{stage}_metrics.jsonl"
        picked.write_text("".join(json.dumps({k: r[k] for k in ("step", *keys) if k in r}) + "\n"
                                  for r in rows))
        png = plot_training_curves(picked, out / f"{stage}_curves.png")
        picked.unlink()
        evals = [r for r in rows if any(k.startswith("eval/") and k in r for k in keys)]
        last = evals[-1] if evals else {}
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k.startswith("eval/") and k in last)
        lines += [f"### {title} curves", "", f"![{stage}]({png.relative_to(run_dir)})", "",
                  f"Last evaluation (step {last.get('step', '-')}): {summary or 'none'}.", ""]
    return lines


def _lengths(run_dir: pathlib.Path) -> list[str]:
    rows = []
    for split in ("train", "dev"):
        path = run_dir / "negatives" / f"{split}_summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        for side in ("chosen", "rejected"):
            st = s["length_words"][side]
            rows.append([split, side, s["pairs"], f"{st['words_mean']:.1f}", f"{st['words_median']:.0f}",
                         f"{st['words_p90']:.0f}", f"{st['tokens_mean']:.1f}"])
        rows.append([split, "filtered", "", json.dumps(s["filtered"]), "", "", ""])
    if not rows:
        return []
    return ["### Pseudo-preference data: chosen vs rejected length", "",
            "A systematic length gap would teach DPO length, not persona.", "",
            markdown_table(["split", "reply", "pairs", "words mean", "median", "p90", "tokens mean"], rows), ""]


def _layouts(run_dir: pathlib.Path) -> list[str]:
    """Each training stage's batch layout as data.packing: auto chose it (<stage>/layout.json)."""
    rows = []
    for stage in ("sft", "dpo"):
        path = run_dir / stage / "layout.json"
        if path.is_file():
            s = json.loads(path.read_text())
            rows.append([stage, s["chosen"], s["why"], f"{s['token_slots']['packed']:,}",
                         f"{s['token_slots']['buckets']:,}",
                         f"{s['programs']['packed']} / {s['programs']['buckets']}"])
    if not rows:
        return []
    return ["### Batch layout per stage (`data.packing: auto`)", "",
            "Token slots one epoch runs through the blocks in each layout, from the batch plan; "
            "programs: compiled step shapes (packed / buckets).", "",
            markdown_table(["stage", "layout", "why", "slots packed", "slots buckets", "programs"],
                           rows), ""]


def _data_stats(run_dir: pathlib.Path) -> list[str]:
    """Each encoding stage's prompt counts (<run>/<stage>/data_stats.json)."""
    rows = []
    for stage in ("sft", "negatives", "dpo"):
        path = run_dir / stage / "data_stats.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        budget = ", ".join(f"{k} {v}" for k, v in s.items() if k.startswith("max_"))
        for split in ("train", "dev"):
            st = s.get(split)
            if st is None:
                continue
            share = 100.0 * st["truncated"] / st["kept"] if st["kept"] else 0.0
            dropped = ", ".join(f"{k} {v}" for k, v in st["dropped"].items()) or "0"
            rows.append([stage, split, st["total"], st["kept"], dropped,
                         f"{st['truncated']} ({share:.0f}%)", st["history_turns_dropped"],
                         s["truncation"], budget])
    if not rows:
        return []
    return ["### Prompts per stage: kept, dropped, truncated", "",
            "truncated: kept records whose oldest history turns were cut to fit the budget "
            "(`data.truncation: drop` drops them instead, as `history_too_long`). negatives: the "
            "sampling prompts (swapped persona), budget max_total − max_response tokens.", "",
            markdown_table(["stage", "split", "records", "kept", "dropped", "truncated",
                            "turns cut", "mode", "budget"], rows), ""]


def _margins(run_dir: pathlib.Path) -> list[str]:
    """The persona-margin distribution of the sampled replies (negatives.filter)."""
    rows = []
    for split in ("train", "dev"):
        path = run_dir / "negatives" / f"{split}_summary.json"
        m = json.loads(path.read_text()).get("persona_margin") if path.is_file() else None
        if m and m["scored"]:
            applied = m.get("applied", True)
            rows.append([split, m["scored"], f"{m['mean']:+.2f}", *(f"{m[q]:+.2f}" for q in (
                "q10", "q25", "median", "q75", "q90")),
                f"> {m['threshold']:g}" if applied else "all (filter_dev: false)",
                m["above_threshold"] if applied else m["scored"] + m["unscored"],
                m["unscored"]])
    if not rows:
        return []
    return ["### Persona margin of the sampled replies (nats)", "",
            "log p(rejected | swapped persona, history) − log p(rejected | own persona, history) "
            "under the SFT model; `negatives.filter: persona_margin` keeps the train pairs above "
            "the threshold (the dev pairs too with `negatives.filter_dev: true`).", "",
            markdown_table(["split", "scored", "mean", "q10", "q25", "median", "q75", "q90",
                            "kept if", "kept", "unscored"], rows), ""]


def _examples(run_dir, cfg, tokenizer, mesh, n: int) -> list[str]:
    try:
        checkpoints = resolve_checkpoints(cfg.eval.checkpoints, run_dir)
    except UserError:
        return []
    records = read_dialogues(cfg.data.dev or pdata.default_paths().dev, key="data.dev")
    histories = select_histories([r for r in records if len(r.history) >= 2], n, seed=cfg.run.seed)
    settings = ResponseSection(num_histories=n, greedy=True, max_new_tokens=cfg.data.max_response_tokens,
                               max_prompt_tokens=cfg.data.max_total_tokens - cfg.data.max_response_tokens)
    replies = responses_for_checkpoints(run_dir / "report" / "examples", checkpoints, tokenizer,
                                        cfg.data.template, histories, settings, mesh=mesh)
    lines = ["### Example replies (greedy), as in the paper's Table 5", ""]
    for i, h in enumerate(histories):
        rows = [["persona", "<br>".join(h.persona)]]
        rows += [["partner" if (len(h.history) - 1 - j) % 2 == 0 else "bot", turn]
                 for j, turn in enumerate(h.history[-4:])]
        rows += [[f"**{label}**", replies[label][i]] for label in checkpoints]
        rows += [["reference", h.response]]
        lines += [markdown_table(["", f"example {i + 1}"], rows), ""]
    return lines


def write_report(run_dir: pathlib.Path, cfg, tokenizer, mesh=None, n_examples: int = 4) -> pathlib.Path:
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# pdpo_jax run report: `{run_dir}`", "",
             f"Stages: {', '.join(cfg.run.stages)}. Config: `{run_dir / 'config.json'}`.", ""]
    for path in (run_dir / "eval" / "dnli" / "report.md", run_dir / "eval" / "judge" / "report.md"):
        if path.is_file():  # each stage's report opens with its own heading
            text = path.read_text().replace("](", f"]({path.parent.relative_to(run_dir)}/")
            lines += [text, ""]
            lines += [f"![{p.stem}]({p.relative_to(run_dir)})" for p in sorted(path.parent.glob("*.png"))]
            lines.append("")
    lines += (["## Training", ""] + _data_stats(run_dir) + _layouts(run_dir) + _curves(run_dir, out)
              + _lengths(run_dir))
    lines += _margins(run_dir)
    lines += _examples(run_dir, cfg, tokenizer, mesh, n_examples)
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def run_report(ctx: RunContext) -> None:
    """The `report` stage."""
    log.info("report: %s", write_report(ctx.run_dir, ctx.cfg, ctx.tokenizer, mesh=ctx.mesh))
