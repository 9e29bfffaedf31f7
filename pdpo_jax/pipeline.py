"""The whole method as resumable stages in one run folder, in the order `run.stages` lists them:
sft → negatives → dpo (PseudoDPO) or rl (the PPO baseline) → eval (Dialogue-NLI) → judge
(pairwise LLM judge) → report.

A stage is a function of the run's `RunContext`, defined beside its kind (train/stages.py,
sampling/negatives.py, eval/stages.py, run_report.py). A stage that finished wrote
`<out_dir>/<stage>/DONE.json`; rerunning the same config skips it, so a crashed run continues
where it stopped (and each stage resumes from its own checkpoints).
"""
from __future__ import annotations

import logging
import pathlib
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils

from pdpo_jax import allocator
from pdpo_jax.config import Config, to_dict
from pdpo_jax.context import RunContext, make_context
from pdpo_jax.errors import UserError
from pdpo_jax.eval.stages import run_eval, run_judge
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.run_report import run_report
from pdpo_jax.sampling.negatives import run_negatives
from pdpo_jax.train.rl_stage import run_rl
from pdpo_jax.train.stages import run_dpo, run_sft
from pdpo_jax.train.steps import DpoObjective

log = logging.getLogger(__name__)

STAGES: dict[str, Callable[[RunContext], object]] = {
    "sft": run_sft, "negatives": run_negatives, "dpo": run_dpo, "rl": run_rl, "eval": run_eval,
    "judge": run_judge, "report": run_report}


def run(cfg: Config) -> pathlib.Path:
    """Runs `cfg.run.stages` in order, skipping finished ones; returns the run folder."""
    unknown = [s for s in cfg.run.stages if s not in STAGES]
    if unknown:
        raise UserError(f"run.stages has unknown stages {unknown}; choose from {list(STAGES)}")
    if "dpo" in cfg.run.stages:  # a DPO loss setting that would do nothing fails now, not after SFT
        DpoObjective.from_section(cfg.dpo)
    ctx = make_context(cfg)
    log.info("run %s: %d %s device(s), %s malloc", ctx.run_dir, jax.device_count(),
             jax.default_backend(), allocator.active())
    if jax.process_index() == 0:  # the run folder is shared by every process
        write_json_atomic(ctx.run_dir / "config.json", to_dict(cfg), indent=2)
    for name in cfg.run.stages:
        marker = ctx.run_dir / name / "DONE.json"
        if marker.is_file():
            log.info("stage %s: done already (%s), skipped", name, marker)
            continue
        start = time.time()
        log.info("stage %s: starting", name)
        STAGES[name](ctx)
        if jax.process_count() > 1:  # done only when every process is: then one marks it
            multihost_utils.sync_global_devices(f"stage {name} done")
        if jax.process_index() == 0:
            write_json_atomic(marker, {"seconds": round(time.time() - start, 1)})
        log.info("stage %s: finished in %.0f s", name, time.time() - start)
    return ctx.run_dir
