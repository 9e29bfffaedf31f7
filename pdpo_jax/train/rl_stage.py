"""The `rl` stage: the paper's +RL(DialogueNLI) baseline, PPO of the SFT model against an NLI
reward (`rl.reward`: a given HF NLI classifier, or one trained first into <run>/reward/).

  <out_dir>/reward/best   the NLI classifier (unless rl.reward.checkpoint names one)
  <out_dir>/rl/best       the policy with the highest dev reward (HF checkpoint + tokenizer)
  <out_dir>/rl/ckpt, metrics.jsonl (trl's names: objective/kl, objective/scores, policy/…)
"""
from __future__ import annotations

import logging
import pathlib

import numpy as np

from pdpo_jax import data as pdata
from pdpo_jax.checkpoint import Checkpointer, exporter
from pdpo_jax.context import RunContext
from pdpo_jax.errors import UserError
from pdpo_jax.metrics import MetricsWriter
from pdpo_jax.reward.nli_reward import NLIReward
from pdpo_jax.reward.train import reward_dir, train_classifier
from pdpo_jax.sharding import batch_divisor
from pdpo_jax.train import optim, ppo, rl
from pdpo_jax.sampling.sampler import stop_ids
from pdpo_jax.train.stages import checkpoint_meta, load_params

log = logging.getLogger(__name__)


def reward_checkpoint(ctx: RunContext) -> pathlib.Path:
    """rl.reward.checkpoint, else the classifier trained (once) into <run>/reward/best."""
    section = ctx.cfg.rl.reward
    if section.checkpoint:
        return pathlib.Path(section.checkpoint).expanduser()
    # resumable: a finished classifier returns at once from its last checkpoint
    return train_classifier(section, reward_dir(ctx.cfg), mesh=ctx.mesh, seed=ctx.cfg.run.seed,
                            keep=ctx.cfg.checkpoint.keep)


def prompt_budget(cfg) -> int:
    """Rollout prompts' token budget: a prompt and its reply fit data.max_total_tokens."""
    return cfg.data.max_total_tokens - cfg.rl.max_new_tokens


def prompts(ctx: RunContext, records, limit: int | None = None) -> list[rl.Prompt]:
    """Rollout prompts of records that have a partner turn to answer (persona + history encoded
    as every stage encodes them, within `prompt_budget`)."""
    d, budget = ctx.cfg.data, prompt_budget(ctx.cfg)
    out = []
    for i, rec in enumerate(records):
        if not rec.history:
            continue
        try:
            enc = pdata.encode_pair(ctx.tokenizer, d.template, rec.persona, rec.history,
                                    max_prompt_tokens=budget)
        except pdata.DoesNotFit:
            continue
        out.append(rl.Prompt(enc.prompt_ids, tuple(rec.persona), i))
        if limit is not None and len(out) == limit:
            break
    return out


def run_rl(ctx: RunContext) -> pathlib.Path:
    """PPO from this run's SFT model (or model.checkpoint) against the NLI reward."""
    cfg, section = ctx.cfg, ctx.cfg.rl
    n = batch_divisor(ctx.mesh)
    if section.minibatch % n or section.rollout_batch % section.minibatch:
        raise UserError(f"rl.minibatch={section.minibatch} must divide rl.rollout_batch="
                        f"{section.rollout_batch} and be a multiple of data*fsdp = {n}")
    out = ctx.stage_dir("rl")
    r = section.reward
    rewards = NLIReward(reward_checkpoint(ctx), function=r.function, labels=r.labels,
                        max_length=r.max_length, mesh=ctx.mesh, unroll_layers=r.unroll_layers)
    train, dev = prompts(ctx, ctx.dialogues("train")), prompts(ctx, ctx.dialogues("dev"),
                                                               section.eval_prompts)
    graphdef, params, model_cfg = load_params(ctx, ctx.sft_model(), section)
    per_epoch = max(len(train) // section.rollout_batch, 1)
    rollouts = min(section.epochs * per_epoch, section.max_rollouts or 10**9)
    updates = rollouts * section.ppo_epochs * (section.rollout_batch // section.minibatch)
    tx, lr = optim.make_optimizer(section.optimizer, updates)
    trainer = rl.PpoTrainer(
        graphdef, params, ctx.tokenizer, rewards, tx, lr,
        rl.RolloutPlan(section.rollout_batch, section.minibatch, section.ppo_epochs,
                       section.max_new_tokens, section.temperature, section.top_p, cfg.run.seed,
                       max_prompt_tokens=prompt_budget(cfg)),
        ppo.PpoHyper(section.gamma, section.lam, section.clip, section.clip_value, section.vf_coef),
        ppo.KlController(section.kl_coef, section.kl_target, section.kl_horizon), ctx.mesh,
        eos_ids=stop_ids(ctx.tokenizer, model_cfg.eos_token_id), pad_id=pdata.pad_id(ctx.tokenizer))
    books = rl.LoopBooks(Checkpointer(out / "ckpt", keep=cfg.checkpoint.keep),
                         MetricsWriter(out, tensorboard=True), exporter(graphdef, out / "best",
                                                                        tokenizer=ctx.tokenizer),
                         checkpoint_meta("rl", model_cfg))
    log.info("rl: %d prompts, %d rollouts of %d", len(train), rollouts, section.rollout_batch)
    best = rl.run_ppo(trainer, train, dev, rollouts=rollouts, eval_every=section.eval_every,
                      books=books)
    books.ckpt.close()
    books.writer.close()
    log.info("rl: best dev reward %s", best)
    return out / "best"
