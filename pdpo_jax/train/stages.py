"""The SFT and DPO stages: load model and data, build the jitted step, hand both to the loop.

Each stage reads and writes inside one run folder:
  <out_dir>/sft/best        HF checkpoint with the lowest dev loss (+ tokenizer)
  <out_dir>/dpo/best        HF checkpoint with the highest dev reward accuracy
  <out_dir>/<stage>/ckpt    orbax state for resuming; metrics.jsonl, tensorboard/ beside it
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

import jax
import numpy as np
from flax import nnx

from pdpo_jax import data as pdata
from pdpo_jax.checkpoint import Checkpointer, exporter
from pdpo_jax.config import StageSection
from pdpo_jax.context import RunContext, check_tokenizer
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.metrics import MetricsWriter
from pdpo_jax.sharding import batch_divisor
from pdpo_jax.models import ModelConfig, config_from_hf, from_pretrained
from pdpo_jax.models.layers import frozen_forward_params
from pdpo_jax.train import loop, optim, reference, state as st
from pdpo_jax.train.steps import (DpoObjective, make_dpo_eval, make_dpo_step, make_sft_eval,
                                  make_sft_step)

log = logging.getLogger(__name__)


def load_params(ctx: RunContext, checkpoint: str | None, stage: StageSection):
    """(graphdef, params, ModelConfig) from an HF folder, or random weights of
    `model.architecture` when `checkpoint` is None; placed on the mesh either way, with the
    model section's dtypes and the stage's gradient checkpointing."""
    m = ctx.cfg.model
    dtypes = m.runtime(stage)
    if checkpoint is not None:
        model = from_pretrained(checkpoint, mesh=ctx.mesh, **dtypes)
        if m.architecture is not None:
            want = config_from_hf(m.architecture, source="model.architecture").replace(**dtypes)
            _check_same_architecture(want, model.cfg, checkpoint)
        check_tokenizer(ctx.tokenizer, model.cfg, checkpoint)
        graphdef, params = nnx.split(model)
        return graphdef, params, model.cfg
    if m.architecture is None:
        raise UserError("set model.checkpoint (an HF folder) or model.architecture (HF config "
                        "keys for a randomly initialised model)")
    model_cfg = config_from_hf(m.architecture, source="model.architecture").replace(**dtypes)
    check_tokenizer(ctx.tokenizer, model_cfg, "model.architecture")
    graphdef, params = st.init_params(model_cfg, ctx.mesh, seed=ctx.cfg.run.seed)
    return graphdef, params, model_cfg


def _check_same_architecture(want: ModelConfig, got: ModelConfig, where: str):
    keys = ("arch", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim")
    diff = {k: (getattr(want, k), getattr(got, k)) for k in keys if getattr(want, k) != getattr(got, k)}
    if diff:
        raise UserError(f"{where}: checkpoint architecture differs from model.architecture "
                        f"(config vs checkpoint): {diff}")


def budgets(ctx: RunContext) -> dict[str, int]:
    """The token budgets a training example is encoded under (data.max_*_tokens)."""
    d = ctx.cfg.data
    return {"max_total_tokens": d.max_total_tokens, "max_response_tokens": d.max_response_tokens}


def encode(ctx: RunContext, records, what: str):
    """(encodings, EncodeStats) of records under the data budgets and data.truncation."""
    d = ctx.cfg.data
    encoded, stats = pdata.encode_records(ctx.tokenizer, d.template, records, **budgets(ctx),
                                          truncate=d.truncation == "truncate")
    log.info("%s: %s", what, stats)
    if not encoded:
        raise UserError(f"{what}: no record fits data.max_total_tokens={d.max_total_tokens} / "
                        f"max_response_tokens={d.max_response_tokens} with data.truncation="
                        f"{d.truncation} ({stats})")
    return encoded, stats


def encode_splits(ctx: RunContext, stage: str, records: dict[str, list]) -> dict[str, list]:
    """encode() each split's records; the counts go to <run>/<stage>/data_stats.json."""
    out, stats = {}, {}
    for split, recs in records.items():
        out[split], stats[split] = encode(ctx, recs, f"{stage} {split}")
    ctx.write_data_stats(stage, stats, **budgets(ctx))
    return out


def _total_steps(stage: StageSection, batches_per_epoch: int) -> int:
    total = stage.epochs * batches_per_epoch
    return min(total, stage.max_steps) if stage.max_steps else total


def _batch_kwargs(ctx: RunContext, stage: StageSection, *, train: bool, pairs: bool = False,
                  packed: bool = False):
    d = ctx.cfg.data
    rows = stage.batch_size * (stage.grad_accum if train else 1)
    packing = None
    if packed:  # each micro-batch packed alone; rows split over this host's batch devices
        share = max(1, batch_divisor(ctx.mesh) // jax.process_count())
        packing = pdata.Packing(d.packed_row_length(pairs), micro_batches=stage.grad_accum if train else 1,
                                row_multiple=share)
    return dict(batch_size=rows, pad_id=pdata.pad_id(ctx.tokenizer), buckets=d.buckets,
                seed=ctx.cfg.run.seed, shuffle=train, drop_remainder=train,
                num_epochs=None if train else 1, packing=packing)


# data.packing: auto packs a stage's batches when packed rows need at most this share of the token
# slots the padded buckets need, and keeps buckets when they need at most this share of packed
# rows' slots. At equal slots packing measured 0.94x (bf16) to 1.05x (fp32) the buckets' speed
# on SmolLM2 SFT (segment masks, wider attention rows); in between, the layout that compiles
# fewer programs wins (packed: one per epoch; buckets: one per bucket the epoch uses; a
# SmolLM2 step compiles in 8-20 s on 2 CPU cores). docs/performance.md has the measurements.
AUTO_PACKING_SHARE = 0.9


def choose_packing(ctx: RunContext, name: str, examples, stage: StageSection, *,
                   pairs: bool) -> bool:
    """Whether stage `name` trains on packed rows: data.packing, or for `auto` the layout whose
    epoch (its first, from the batch plan) runs fewer token slots through the blocks by more
    than 1 - AUTO_PACKING_SHARE, else the one with fewer compiled shapes. Written to
    <run>/<name>/layout.json; every host computes the same answer from the global plan."""
    setting = ctx.cfg.data.packing
    if setting != "auto":
        return bool(setting)
    build = pdata.preference_batches if pairs else pdata.sft_batches
    slots, programs = {}, {}
    for layout in ("packed", "buckets"):
        batches = build(examples, **_batch_kwargs(ctx, stage, train=True, pairs=pairs,
                                                  packed=layout == "packed"))
        slots[layout] = layout_slots(ctx, batches, pairs=pairs, packed=layout == "packed")
        programs[layout] = len(set(batches.epoch_shapes()))
    if slots["packed"] <= AUTO_PACKING_SHARE * slots["buckets"]:
        packed, why = True, "fewer token slots"
    elif slots["buckets"] <= AUTO_PACKING_SHARE * slots["packed"]:
        packed, why = False, "fewer token slots"
    else:
        packed, why = programs["packed"] < programs["buckets"], "token slots within 10%: fewer programs"
    chosen = "packed" if packed else "buckets"
    log.info("%s: data.packing auto -> %s (%s; token slots per epoch: packed %d, buckets %d; "
             "programs %d / %d)", name, chosen, why, slots["packed"], slots["buckets"],
             programs["packed"], programs["buckets"])
    if jax.process_index() == 0:
        write_json_atomic(ctx.stage_dir(name) / "layout.json", {
            "packing": "auto", "chosen": chosen, "why": why, "token_slots": slots,
            "programs": programs, "share": AUTO_PACKING_SHARE}, indent=2)
    return packed


def layout_slots(ctx: RunContext, batches: pdata.Batches, *, pairs: bool, packed: bool) -> int:
    """Token slots one epoch of `batches` runs through the model's blocks, as the training step
    lays them out: packed rows as they are; a bucketed DPO pair as one [prompt | chosen |
    rejected] row of T + max_response_tokens (dpo.share_prompt) or as two rows of T."""
    window, share = ctx.cfg.data.max_response_tokens, ctx.cfg.dpo.share_prompt
    if packed or not pairs:
        return sum(rows * length for rows, length in batches.epoch_shapes())
    return sum(rows * (length + window) if share else 2 * rows * length
               for rows, length in batches.epoch_shapes())


def _spec(ctx: RunContext, name: str, stage: StageSection, total: int,
          selection: loop.Selection) -> loop.LoopSpec:
    return loop.LoopSpec(name=name, total_steps=total, grad_accum=stage.grad_accum,
                         log_every=stage.log_every, eval_every=min(stage.eval_every, total),
                         save_every=ctx.cfg.checkpoint.save_every, selection=selection)


def _exporter(ctx: RunContext, graphdef, folder: pathlib.Path):
    return exporter(graphdef, folder, tokenizer=ctx.tokenizer)


def checkpoint_meta(stage: str, model_cfg: ModelConfig) -> dict:
    return {"stage": stage, "model": json.loads(json.dumps(dataclasses.asdict(model_cfg)))}


def run_sft(ctx: RunContext) -> pathlib.Path:
    """SFT of model.checkpoint (or a random model.architecture) on data.train."""
    cfg, stage = ctx.cfg, ctx.cfg.sft
    out = ctx.stage_dir("sft")
    encoded = encode_splits(ctx, "sft", {s: ctx.dialogues(s) for s in ("train", "dev")})
    train, dev = encoded["train"], encoded["dev"]
    graphdef, params, model_cfg = load_params(ctx, cfg.model.checkpoint, stage)
    packed = choose_packing(ctx, "sft", train, stage, pairs=False)
    batches = pdata.sft_batches(train, **_batch_kwargs(ctx, stage, train=True, packed=packed))
    dev_batches = pdata.sft_batches(dev, **_batch_kwargs(ctx, stage, train=False, packed=packed))
    total = _total_steps(stage, batches.batches_per_epoch)
    tx, lr = optim.make_optimizer(stage.optimizer, total)
    state, state_sh = st.create_state(params, tx, ctx.mesh)
    window = cfg.data.max_response_tokens
    step = st.jit_sft_step(make_sft_step(graphdef, tx, lr, window=window), state_sh, ctx.mesh)
    eval_fn = jax.jit(make_sft_eval(graphdef, window=window))

    def evaluate(params):
        nll = count = 0.0
        for batch in dev_batches.iterator():
            s, n = eval_fn(params, _squeeze(st.shard_batch(_one_micro(batch), ctx.mesh)))
            nll, count = nll + float(s), count + float(n)
        loss = nll / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}

    writer = MetricsWriter(out, tensorboard=True, enabled=jax.process_index() == 0)
    ckpt = Checkpointer(out / "ckpt", keep=cfg.checkpoint.keep)
    loop.run(_spec(ctx, "sft", stage, total, loop.Selection("loss", "min")), state=state, step_fn=step,
             batches=batches, mesh=ctx.mesh, evaluate=evaluate,
             export=_exporter(ctx, graphdef, out / "best"), ckpt=ckpt, writer=writer,
             meta=checkpoint_meta("sft", model_cfg))
    ckpt.close()
    writer.close()
    return out / "best"


def _one_micro(batch):
    return {k: np.asarray(v)[None] for k, v in batch.items() if k != "index"}


def _squeeze(batch):
    return {k: v[0] for k, v in batch.items()}


def preference_files(ctx: RunContext) -> tuple[pathlib.Path, pathlib.Path]:
    d = ctx.cfg.dpo
    negatives = ctx.run_dir / "negatives"
    train = pathlib.Path(d.pairs) if d.pairs else negatives / "train_pairs.jsonl"
    dev = pathlib.Path(d.dev_pairs) if d.dev_pairs else negatives / "dev_pairs.jsonl"
    for path, key in ((train, "dpo.pairs"), (dev, "dpo.dev_pairs")):
        if not path.is_file():
            raise UserError(f"{path}: preference pairs not found; run the `negatives` stage first "
                            f"or set {key} to a preference JSONL file")
    return train, dev


def run_dpo(ctx: RunContext) -> pathlib.Path:
    """DPO from this run's SFT model (or model.checkpoint) against it as the frozen reference."""
    cfg, stage = ctx.cfg, ctx.cfg.dpo
    init_checkpoint = ctx.sft_model()
    out = ctx.stage_dir("dpo")
    train_path, dev_path = preference_files(ctx)
    encoded = encode_splits(ctx, "dpo", {"train": pdata.read_preference_jsonl(train_path),
                                         "dev": pdata.read_preference_jsonl(dev_path)})
    train, dev = encoded["train"], encoded["dev"]
    graphdef, params, model_cfg = load_params(ctx, init_checkpoint, stage)
    window = cfg.data.max_response_tokens
    packed = choose_packing(ctx, "dpo", train, stage, pairs=True)
    batches = pdata.preference_batches(train, **_batch_kwargs(ctx, stage, train=True, pairs=True,
                                                              packed=packed))
    dev_batches = pdata.preference_batches(dev, **_batch_kwargs(ctx, stage, train=False, pairs=True,
                                                                packed=packed))
    objective = DpoObjective.from_section(stage)
    # A reference-free objective (SimPO, ORPO, SFT) holds no reference and scores none.
    precomputed = stage.precompute_ref and objective.needs_reference
    held = objective.needs_reference and not precomputed
    ref_params = None
    if precomputed:  # the policy starts as the reference: score with it, keep one copy
        batches, dev_batches = (
            reference.WithReference(b, _cached_reference(ctx, graphdef, params, enc, path,
                                                            init_checkpoint, packed))
            for b, enc, path in ((batches, train, train_path), (dev_batches, dev, dev_path)))
    elif held:
        # frozen (the policy is donated), its matrices in the compute dtype: the same forward
        ref_params = frozen_forward_params(nnx.merge(graphdef, params))
    total = _total_steps(stage, batches.batches_per_epoch)
    tx, lr = optim.make_optimizer(stage.optimizer, total)
    state, state_sh = st.create_state(params, tx, ctx.mesh)
    share = stage.share_prompt
    step = make_dpo_step(graphdef, tx, lr, objective, window=window, precomputed_ref=precomputed,
                         share_prompt=share)
    step_fn = st.jit_dpo_step(step, state_sh, ctx.mesh, with_reference=held)
    eval_fn = jax.jit(make_dpo_eval(graphdef, objective, window=window, precomputed_ref=precomputed,
                                    share_prompt=share))

    def evaluate(params):
        sums, pairs = {}, 0.0
        for batch in dev_batches.iterator():
            out_sums, n = eval_fn(params, ref_params, _squeeze(st.shard_batch(_one_micro(batch), ctx.mesh)))
            for k, v in out_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            pairs += float(n)
        return {k: v / max(pairs, 1.0) for k, v in sums.items()} | {"pairs": pairs}

    writer = MetricsWriter(out, tensorboard=True, enabled=jax.process_index() == 0)
    ckpt = Checkpointer(out / "ckpt", keep=cfg.checkpoint.keep)
    train_step = (lambda s, b: step_fn(s, ref_params, b)) if held else step_fn
    loop.run(_spec(ctx, "dpo", stage, total, loop.Selection("rewards/accuracies", "max")), state=state,
             step_fn=train_step, batches=batches, mesh=ctx.mesh,
             evaluate=evaluate, export=_exporter(ctx, graphdef, out / "best"), ckpt=ckpt,
             writer=writer, meta=checkpoint_meta("dpo", model_cfg))
    ckpt.close()
    writer.close()
    return out / "best"


def _cached_reference(ctx: RunContext, graphdef, params, encoded, pairs_path, checkpoint,
                      packed: bool):
    cfg = ctx.cfg
    key = reference.cache_key(checkpoint, pairs_path, cfg.data, ctx.tokenizer, cfg.run.seed)
    path = ctx.run_dir / "dpo" / "ref_logps" / f"{pairs_path.stem}-{key}.npy"
    ordered = pdata.preference_batches(encoded, **_batch_kwargs(ctx, cfg.dpo, train=False, pairs=True,
                                                                 packed=packed))
    return reference.load_or_compute(path, lambda: reference.compute(
        graphdef, params, ordered, len(encoded), ctx.mesh, window=cfg.data.max_response_tokens,
        share_prompt=cfg.dpo.share_prompt))
