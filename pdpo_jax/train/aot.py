"""Ahead-of-time checks: lower a config's DPO step on a mesh without any weights.

`lower_dpo_step(cfg, mesh)` traces and lowers the exact jitted step a run would execute
(abstract parameters from `eval_shape`, optimizer state, reference params, one global batch
at the largest bucket), so a 13B config is checked for shapes and shardings on a laptop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax import sharding as shd
from pdpo_jax.config import Config
from pdpo_jax.models import build_model, config_from_hf
from pdpo_jax.train import optim, state as st
from pdpo_jax.train.steps import DpoObjective, TrainState, make_dpo_step

_FIELDS = {"tokens": jnp.int32, "positions": jnp.int32, "attention_mask": jnp.bool_,
           "loss_mask": jnp.bool_}


def abstract_batch(cfg: Config) -> dict:
    """ShapeDtypeStructs of one DPO step's global batch: [grad_accum, batch_size, max bucket]."""
    shape = (cfg.dpo.grad_accum, cfg.dpo.batch_size, max(cfg.data.buckets))
    return {f"{side}_{k}": jax.ShapeDtypeStruct(shape, dt)
            for side in ("chosen", "rejected") for k, dt in _FIELDS.items()}


def dpo_step_and_args(cfg: Config, mesh: Mesh):
    """(the config's jitted DPO step on `mesh`, its abstract arguments (state, reference
    params, batch)): what a run would execute, without any weights."""
    m = cfg.model
    model_cfg = config_from_hf(m.architecture, source="model.architecture").replace(
        **m.runtime(cfg.dpo))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
    tx, lr = optim.make_optimizer(cfg.dpo.optimizer, total_steps=1000)
    param_sh = shd.tree_shardings(params, mesh)
    opt_state = jax.eval_shape(tx.init, params)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
    state_sh = TrainState(NamedSharding(mesh, P()), param_sh, shd.tree_shardings(opt_state, mesh))
    step = make_dpo_step(graphdef, tx, lr, DpoObjective.from_section(cfg.dpo),
                         window=cfg.data.max_response_tokens, share_prompt=cfg.dpo.share_prompt)
    return st.jit_dpo_step(step, state_sh, mesh), (state, params, abstract_batch(cfg))


def lower_dpo_step(cfg: Config, mesh: Mesh):
    """jax.stages.Lowered of the config's DPO step on `mesh`."""
    step, args = dpo_step_and_args(cfg, mesh)
    return step.lower(*args)
