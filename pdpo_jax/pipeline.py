"""The whole method as resumable stages in one run folder: sft → negatives → dpo → eval → report.

A stage that finished wrote `<out_dir>/<stage>/DONE.json`; rerunning the same config skips it,
so a crashed run continues where it stopped (and each stage resumes from its own checkpoints).
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Callable

from pdpo_jax.config import Config, to_dict
from pdpo_jax.train import stages

log = logging.getLogger(__name__)


def sft_model(ctx: stages.RunContext) -> str | None:
    """The model later stages start from: this run's selected SFT model, else model.checkpoint."""
    best = ctx.run_dir / "sft" / "best"
    if "sft" in ctx.cfg.run.stages or best.is_dir():
        if not (best / "config.json").is_file():
            raise ValueError(f"{best}: no SFT model; run the `sft` stage first")
        return str(best)
    return ctx.cfg.model.checkpoint


def _sft(ctx):
    stages.run_sft(ctx)


def _dpo(ctx):
    stages.run_dpo(ctx, sft_model(ctx))


STAGES: dict[str, Callable[[stages.RunContext], None]] = {"sft": _sft, "dpo": _dpo}


def register(name: str, fn: Callable[[stages.RunContext], None]) -> None:
    STAGES[name] = fn


def run(cfg: Config) -> pathlib.Path:
    unknown = [s for s in cfg.run.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"run.stages has unknown stages {unknown}; choose from {list(STAGES)}")
    ctx = stages.make_context(cfg)
    (ctx.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    for name in cfg.run.stages:
        marker = ctx.run_dir / name / "DONE.json"
        if marker.is_file():
            log.info("stage %s: done already (%s), skipped", name, marker)
            continue
        start = time.time()
        log.info("stage %s: starting", name)
        STAGES[name](ctx)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
        log.info("stage %s: finished in %.0f s", name, time.time() - start)
    return ctx.run_dir
