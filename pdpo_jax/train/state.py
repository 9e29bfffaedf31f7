"""Sharded train state: born sharded, stepped by functions jitted once with declared shardings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax import sharding as shd
from pdpo_jax.models import ModelConfig, build_model
from pdpo_jax.train.steps import TrainState


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int, rules=shd.TRAIN_RULES):
    """Random parameters created directly in their shardings (never whole on one device)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=seed)))
    shardings = shd.tree_shardings(abstract, mesh, rules)
    params = jax.jit(lambda: nnx.split(build_model(cfg, seed=seed))[1], out_shardings=shardings)()
    return graphdef, params


def create_state(params, tx, mesh: Mesh, rules=shd.TRAIN_RULES):
    """(TrainState, its shardings) with params placed by the rules table and moments alike."""
    param_sh = shd.tree_shardings(params, mesh, rules)
    params = jax.device_put(params, param_sh)
    opt_sh = shd.tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    replicated = NamedSharding(mesh, P())
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step, params, opt_state), TrainState(replicated, param_sh, opt_sh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leaves are [A, B, ...]: micro-batches replicated, B over data×fsdp."""
    return NamedSharding(mesh, P(None, shd.BATCH_AXES))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy [A, B_local, ...] → global jax arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    n = shd.batch_divisor(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_b = value.shape[1] * jax.process_count()
        if global_b % n:
            raise ValueError(f"global batch size {global_b} must be divisible by data*fsdp = {n}; "
                             "set the stage's batch_size or mesh.data/mesh.fsdp")
        global_shape = (value.shape[0], global_b, *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def jit_sft_step(step, state_sh, mesh):
    return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=(0,))


def jit_dpo_step(step, state_sh, mesh, *, with_reference: bool = True):
    """The reference params share the policy's shardings and are never donated. Without
    them (precomputed reference log-probs), the jitted step is `step(state, batch)`."""
    if not with_reference:
        return jax.jit(lambda state, batch: step(state, None, batch),
                       in_shardings=(state_sh, batch_sharding(mesh)),
                       out_shardings=(state_sh, None), donate_argnums=(0,))
    return jax.jit(step, in_shardings=(state_sh, state_sh.params, batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
