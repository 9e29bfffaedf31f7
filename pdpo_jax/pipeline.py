"""The whole method as resumable stages in one run folder:
sft → negatives → dpo → eval (Dialogue-NLI) → judge (pairwise LLM judge) → report.

A stage that finished wrote `<out_dir>/<stage>/DONE.json`; rerunning the same config skips it,
so a crashed run continues where it stopped (and each stage resumes from its own checkpoints).
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.config import Config, to_dict
from pdpo_jax.fileio import atomic_path
from pdpo_jax.models import from_pretrained
from pdpo_jax.sampling import SamplingConfig
from pdpo_jax.sampling.negatives import NegativeBuilder, NegativeJob, swapped_personas
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


def _negatives(ctx):
    cfg, neg = ctx.cfg, ctx.cfg.negatives
    out = ctx.stage_dir("negatives")
    if neg.mode == "external":
        _copy_external_pairs(neg.external, out)
        return
    generator = sft_model(ctx)
    if generator is None:
        raise ValueError("the negatives stage samples from an SFT model: add `sft` to run.stages "
                         "or set model.checkpoint")
    mesh = ctx.mesh
    if jax.process_count() > 1:  # each host samples its own shards on its own devices
        mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())
    # Sampling needs no fp32 master weights: hold them in the compute dtype (bf16 halves a 13B),
    # loaded straight into the sampler's decode layout and sharding (no second copy).
    model = from_pretrained(generator, mesh=mesh, dtype=cfg.model.dtype, param_dtype=cfg.model.dtype,
                            rules=shd.SAMPLING_RULES, stack_layers=False)
    stages.check_tokenizer(ctx.tokenizer, model.cfg, generator)
    eos = {ctx.tokenizer.eos_token_id, *np.atleast_1d(model.cfg.eos_token_id or [])} - {None}
    sampling = SamplingConfig(max_new_tokens=cfg.data.max_response_tokens,
                              temperature=neg.temperature, top_p=neg.top_p, top_k=neg.top_k,
                              eos_ids=tuple(sorted(int(e) for e in eos)), seed=cfg.run.seed,
                              pad_id=pdata.pad_id(ctx.tokenizer))
    builder = NegativeBuilder(model, ctx.tokenizer, cfg.data.template, sampling,
                              max_prompt_tokens=cfg.data.max_total_tokens - cfg.data.max_response_tokens,
                              batch_size=neg.batch_size, shard_size=neg.shard_size,
                              keep_truncated=neg.keep_truncated, generator=generator, mesh=mesh)
    paths = pdata.default_paths() if not (cfg.data.train and cfg.data.dev) else None
    summaries = {}
    for name, path, limit, default in (
            ("train", cfg.data.train, cfg.data.max_train_records, paths and paths.train),
            ("dev", cfg.data.dev, cfg.data.max_dev_records, paths and paths.dev)):
        records = stages.read_dialogues(path, limit, default)
        if not records:
            raise ValueError(f"data.{name}: no records to build negatives from")
        personas = (swapped_personas(records, cfg.run.seed) if neg.mode == "shuffle"
                    else [tuple(r.persona) for r in records])
        summaries[name] = builder.run(NegativeJob(name, records, personas, out))
    log.info("negatives: %s", json.dumps(summaries))


def _copy_external_pairs(folder: str | None, out: pathlib.Path) -> None:
    if not folder:
        raise ValueError("negatives.mode=external needs negatives.external: a folder holding "
                         "train_pairs.jsonl and dev_pairs.jsonl written by another run")
    for name in ("train_pairs.jsonl", "dev_pairs.jsonl"):
        src = pathlib.Path(folder) / name
        if not src.is_file():
            raise ValueError(f"{src}: missing; negatives.external must be another run's "
                             "negatives folder")
        pdata.read_preference_jsonl(src)  # validates every line before anything is copied
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)


def _eval(ctx):
    from pdpo_jax.eval import resolve_checkpoints, run_dnli_stage
    checkpoints = resolve_checkpoints(ctx.cfg.eval.checkpoints, ctx.run_dir)
    markdown = run_dnli_stage(ctx.stage_dir("eval"), checkpoints, ctx.tokenizer, ctx.cfg.eval,
                              ctx.cfg.data.template, mesh=ctx.mesh)
    log.info("Dialogue-NLI:\n%s", markdown)


def _judge(ctx):
    from pdpo_jax.eval import resolve_checkpoints, run_judge_stage
    cfg = ctx.cfg
    checkpoints = resolve_checkpoints(cfg.eval.checkpoints, ctx.run_dir)
    paths = pdata.default_paths() if not cfg.data.dev else None
    histories = stages.read_dialogues(cfg.data.dev, None, paths and paths.dev)
    markdown = run_judge_stage(ctx.stage_dir("eval"), checkpoints, ctx.tokenizer, histories,
                               cfg.eval.judge, cfg.eval.responses, template=cfg.data.template,
                               mesh=ctx.mesh)
    log.info("judge:\n%s", markdown)


def _report(ctx):
    from pdpo_jax.report import write_report
    path = write_report(ctx.run_dir, ctx.cfg, ctx.tokenizer, mesh=ctx.mesh)
    log.info("report: %s", path)


STAGES: dict[str, Callable[[stages.RunContext], None]] = {
    "sft": _sft, "negatives": _negatives, "dpo": _dpo, "eval": _eval, "judge": _judge,
    "report": _report}


def register(name: str, fn: Callable[[stages.RunContext], None]) -> None:
    STAGES[name] = fn


def run(cfg: Config) -> pathlib.Path:
    unknown = [s for s in cfg.run.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"run.stages has unknown stages {unknown}; choose from {list(STAGES)}")
    ctx = stages.make_context(cfg)
    if jax.process_index() == 0:  # the run folder is shared by every process
        (ctx.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
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
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
        log.info("stage %s: finished in %.0f s", name, time.time() - start)
    return ctx.run_dir
