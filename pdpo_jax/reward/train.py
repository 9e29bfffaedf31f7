"""Training the NLI reward classifier with the loop SFT and DPO use.

    best = train_classifier(cfg.rl.reward, "runs/x/reward", mesh=mesh, seed=0)

Data: `rl.reward.train`/`dev` NLI files, or (train empty) the substitute set built from the
SPC test split, written to <out>/data. Model: random weights of `rl.reward.architecture` with a
head for `rl.reward.labels`. Same optimizer (`optim.make_optimizer`), sharded state
(`create_state`), batches (`shard_batch`), loop, Checkpointer and atomic HF export as the other
stages; the exported model (<out>/best, with the tokenizer) is the one with the best dev
accuracy. Folder layout:
  <out>/best          HF …ForSequenceClassification + tokenizer + pdpo_selection.json
  <out>/ckpt          orbax state for resuming; metrics.jsonl and tensorboard/ beside it
  <out>/data          the substitute set (when built) and its stats.json
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh

from pdpo_jax import data as pdata
from pdpo_jax.checkpoint import Checkpointer, exporter
from pdpo_jax.config import Config, RewardSection
from pdpo_jax.errors import UserError
from pdpo_jax.metrics import MetricsWriter
from pdpo_jax.models import ModelConfig, config_from_hf
from pdpo_jax.models.hf_configs import CLASSIFIERS
from pdpo_jax.reward import nli_data, substitute
from pdpo_jax.reward.classifier import make_classifier_eval, make_classifier_step
from pdpo_jax.train import loop, optim, state as st

log = logging.getLogger(__name__)


def reward_dir(cfg: Config) -> pathlib.Path:
    """Where `rl.reward` trains: rl.reward.out_dir, else <run.out_dir>/reward."""
    return pathlib.Path(cfg.rl.reward.out_dir or pathlib.Path(cfg.run.out_dir) / "reward")


def nli_sets(section: RewardSection, out: pathlib.Path, seed: int):
    """(train pairs, dev pairs): the configured files, or the substitute set (written to out/data)."""
    if section.train:
        if not section.dev:
            raise UserError("rl.reward.train is set but rl.reward.dev is not; give a dev NLI file "
                            "too (the best dev accuracy selects the model)")
        return nli_data.read_nli(section.train), nli_data.read_nli(section.dev)
    if section.dev:
        raise UserError("rl.reward.dev is set but rl.reward.train is empty; set both, or neither "
                        "to build the substitute set")
    paths = pdata.default_paths()
    subset = substitute.build_substitute(paths.train, paths.dnli, seed=seed)
    substitute.write_substitute(out / "data", subset)
    log.info("substitute NLI set: %s", json.dumps({k: subset.stats[k]["labels"] for k in ("train", "dev")}))
    return subset.train, subset.dev


def classifier_config(section: RewardSection, tokenizer) -> ModelConfig:
    """The classifier `rl.reward.architecture` describes, with a head for `rl.reward.labels`
    and the tokenizer's pad id (RoBERTa counts positions from it)."""
    if section.architecture is None:
        raise UserError("set rl.reward.architecture (HF config keys of the classifier to train) "
                        "or rl.reward.checkpoint (an HF NLI classifier to use as it is)")
    arch = dict(section.architecture)
    model_type = arch.get("model_type")
    if model_type not in CLASSIFIERS:
        raise UserError(f"rl.reward.architecture.model_type={model_type!r}; choose one of "
                        f"{sorted(CLASSIFIERS)}")
    arch.setdefault("pad_token_id", pdata.pad_id(tokenizer))
    arch.update(architectures=[CLASSIFIERS[model_type]], id2label=dict(enumerate(section.labels)))
    cfg = config_from_hf(arch, source="rl.reward.architecture").replace(unroll_layers=section.unroll_layers)
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"rl.reward.architecture: vocab_size={cfg.vocab_size} but the tokenizer has "
                        f"{len(tokenizer)} tokens; raise vocab_size or change rl.reward.tokenizer")
    if cfg.arch == "bert" and section.max_length + cfg.position_offset > cfg.max_positions:
        raise UserError(f"rl.reward.max_length={section.max_length} needs max_position_embeddings "
                        f">= {section.max_length + cfg.position_offset}")
    return cfg


def train_classifier(section: RewardSection, out_dir: str | pathlib.Path, *, mesh: Mesh, seed: int = 0,
                     keep: int = 2, save_every: int = 0) -> pathlib.Path:
    """Trains the reward classifier (module doc); returns the folder of the selected model."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not section.tokenizer:
        raise UserError("rl.reward.tokenizer is not set; point it at a tokenizer folder")
    tokenizer = nli_data.load_tokenizer(section.tokenizer)
    model_cfg = classifier_config(section, tokenizer)
    train_pairs, dev_pairs = nli_sets(section, out, seed)
    encode = lambda pairs: nli_data.encode_nli(  # noqa: E731
        tokenizer, pairs, section.labels, max_length=section.max_length,
        token_types=model_cfg.type_vocab_size > 1)
    common = dict(pad_id=pdata.pad_id(tokenizer), buckets=section.buckets, seed=seed)
    batches = pdata.classification_batches(encode(train_pairs), batch_size=section.batch_size *
                                           section.grad_accum, num_epochs=None, **common)
    dev_batches = pdata.classification_batches(encode(dev_pairs), batch_size=section.batch_size,
                                               shuffle=False, drop_remainder=False, **common)
    total = section.epochs * batches.batches_per_epoch
    total = min(total, section.max_steps) if section.max_steps else total
    graphdef, params = st.init_params(model_cfg, mesh, seed=seed)
    tx, lr = optim.make_optimizer(section.optimizer, total)
    state, state_sh = st.create_state(params, tx, mesh)
    step = st.jit_sft_step(make_classifier_step(graphdef, tx, lr), state_sh, mesh)  # (state, batch)
    spec = loop.LoopSpec(name="reward", total_steps=total, grad_accum=section.grad_accum,
                         log_every=section.log_every, eval_every=min(section.eval_every, total),
                         save_every=save_every, selection=loop.Selection("accuracy", "max"))
    writer = MetricsWriter(out, tensorboard=True, enabled=jax.process_index() == 0)
    ckpt = Checkpointer(out / "ckpt", keep=keep)
    meta = {"stage": "reward", "model": json.loads(json.dumps(dataclasses.asdict(model_cfg)))}
    loop.run(spec, state=state, step_fn=step, batches=batches, mesh=mesh,
             evaluate=dev_evaluator(graphdef, dev_batches, mesh, section.labels),
             export=exporter(graphdef, out / "best", tokenizer=tokenizer), ckpt=ckpt,
             writer=writer, meta=meta)
    ckpt.close()
    writer.close()
    return out / "best"


def dev_evaluator(graphdef, dev_batches, mesh: Mesh, labels: tuple[str, ...]):
    """evaluate(params) -> dev loss, accuracy, per-class accuracy (recall) and example count."""
    eval_fn = jax.jit(make_classifier_eval(graphdef, len(labels)))

    def evaluate(params) -> dict:
        sums = None
        for batch in dev_batches.iterator():
            sharded = st.shard_batch({k: np.asarray(v)[None] for k, v in batch.items() if k != "index"},
                                     mesh)
            out = jax.device_get(eval_fn(params, {k: v[0] for k, v in sharded.items()}))
            sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
        count = float(sums["count_C"].sum())
        metrics = {"loss": float(sums["nll"]) / max(count, 1.0),
                   "accuracy": float(sums["correct_C"].sum()) / max(count, 1.0), "examples": count}
        for c, name in enumerate(labels):
            metrics[f"accuracy/{name}"] = float(sums["correct_C"][c]) / max(float(sums["count_C"][c]), 1.0)
        return metrics
    return evaluate
