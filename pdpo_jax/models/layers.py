"""The layer stack: stacked layers built with nnx.vmap (a leading 'layers' axis) and run with
lax.scan, or (with a KV cache, or unstacked) as a Python loop over per-layer modules; the
decode layout (`unstack_layers`) and the frozen reference's parameters (`frozen_forward_params`).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pdpo_jax.models.attention import KVCache, attention_mask_BTS, key_info
from pdpo_jax.models.config import ModelConfig

def take_columns(x_BT, index_BQ):
    """x[b, index[b, q]] for every row b and q: [B, Q, ...], a gather inside each row (a
    batch-sharded array moves nothing between devices)."""
    index = index_BQ.reshape(index_BQ.shape + (1,) * (x_BT.ndim - 2))
    return jnp.take_along_axis(x_BT, index, axis=1)


def select_queries(select_BQ, x_BTD, per_position, mask_BTS):
    """What a last layer restricted to the columns select_BQ needs: its input, per-position
    table (e.g. RoPE's (cos, sin); None passes) and attention-mask rows at those columns.
    None selects every column (returns the arguments as they are)."""
    if select_BQ is None:
        return x_BTD, per_position, mask_BTS
    take = lambda x: take_columns(x, select_BQ)
    return take(x_BTD), jax.tree.map(take, per_position), take(mask_BTS)


def make_stacked_layers(build: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build_one(key):
        return build(nnx.Rngs(key))
    return build_one(jax.random.split(rngs.params(), num_layers))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("dense")),
}


def run_layers(cfg: ModelConfig, layers: nnx.Module, h_BTD, positions_BT, attention_mask_BT,
               cache: KVCache | None, per_position=None, segments_BT=None, select_BQ=None):
    """Runs every layer over h; each layer is `block(h, pos, mask_BTS, keys, kv) -> (h, kv)`
    with pos = `per_position` (what the blocks need per token, e.g. RoPE tables, computed once
    for all layers) or else positions_BT. segments_BT: see `key_info`.

    Without a cache (training, scoring) the loop is a lax.scan over the stacked layer
    parameters (compile time independent of depth), optionally rematerialised per block and
    unrolled (cfg.unroll_layers). With a cache, or with unstacked layers (`unstack_layers`),
    it is a Python loop: each layer reads and writes its own cache arrays in place (a scan
    would dynamic-slice every weight and cache array of every layer at every decode step).

    select_BQ: int [B, Q] columns of each row whose output is wanted (None: all). The result is
    then h at those columns, [B, Q, D], and the last layer computes only what they need: keys
    and values of every column, queries, attention, residual and MLP at the Q columns alone
    (a prefill needs one column of T, a DPO step the 2·window scored ones). Only where
    `last_layer_selects`: a rolled scan keeps every layer in it (splitting off the last would
    copy the stacked weights), so there the caller gathers after it (`final_hidden`).
    """
    if select_BQ is not None and not last_layer_selects(cfg, layers, cache):
        raise ValueError("a rolled layer scan cannot select columns inside its last layer; "
                         "gather after it (final_hidden does)")
    keys = key_info(positions_BT, attention_mask_BT, cache, segments_BT)
    mask_BTS = attention_mask_BTS(cfg, positions_BT, keys)
    pos = positions_BT if per_position is None else per_position
    if not isinstance(layers, nnx.List) and cache is None:
        graphdef, state = nnx.split(layers)

        def body(h, layer_state):
            h, _ = nnx.merge(graphdef, layer_state)(h, pos, mask_BTS, keys, None)
            return h, None

        def last(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, pos, mask_BTS, keys, None, select_BQ)[0]

        if cfg.remat != "none":
            remat = functools.partial(jax.checkpoint, policy=_REMAT_POLICIES[cfg.remat],
                                      prevent_cse=False)
            body, last = remat(body), remat(last)
        if select_BQ is None:
            return jax.lax.scan(body, h_BTD, state, unroll=unrolled(cfg))[0], None
        h_BTD = jax.lax.scan(body, h_BTD, jax.tree.map(lambda x: x[:-1], state), unroll=True)[0]
        return last(h_BTD, jax.tree.map(lambda x: x[-1], state)), None

    blocks = list(layers) if isinstance(layers, nnx.List) else _layer_modules(layers)
    kvs = list(zip(cache.k, cache.v)) if cache is not None else [None] * len(blocks)
    for layer, block in enumerate(blocks):
        select = select_BQ if layer == len(blocks) - 1 else None
        h_BTD, kvs[layer] = block(h_BTD, pos, mask_BTS, keys, kvs[layer], select)
    if cache is None:
        return h_BTD, None
    ks, vs = zip(*kvs)
    return h_BTD, KVCache(k=ks, v=vs, positions=keys.positions_BS, valid=keys.valid_BS,
                          length=cache.length + positions_BT.shape[1])


def unrolled(cfg: ModelConfig) -> bool:
    """Whether the cacheless layer scan is unrolled: `cfg.unroll_layers`, unless layers are
    rematerialised. Unrolled, XLA:CPU has no [L, ...] stacked residual buffers to update by
    copying (faster steps, longer compiles: docs/performance.md), but it schedules every
    layer's recomputation before the backward starts, all live at once, so remat saved
    nothing there (SmolLM2-135M SFT step, `bench/memory_probe.py`, before attention and SwiGLU
    kept less: 2,812 MiB of temp with remat unrolled, 2,860 without remat, 1,640 rolled;
    tests/test_step_memory.py)."""
    return bool(cfg.unroll_layers) and cfg.remat == "none"


def last_layer_selects(cfg: ModelConfig, layers: nnx.Module, cache: KVCache | None) -> bool:
    """Whether `run_layers` runs the last layer at select_BQ's columns alone: with a cache,
    unstacked layers or an unrolled scan. A rolled scan returns every column instead."""
    return cache is not None or isinstance(layers, nnx.List) or unrolled(cfg)


def final_hidden(cfg: ModelConfig, layers: nnx.Module, h_BTD, positions_BT, attention_mask_BT,
                 cache: KVCache | None, final_norm: Callable, select_BQ=None, **kw):
    """`run_layers`, then the final norm; with select_BQ, [B, Q, D] at those columns (selected
    inside the last layer where `last_layer_selects`, else gathered after the norm)."""
    inside = select_BQ is not None and last_layer_selects(cfg, layers, cache)
    h, cache = run_layers(cfg, layers, h_BTD, positions_BT, attention_mask_BT, cache,
                          select_BQ=select_BQ if inside else None, **kw)
    h = final_norm(h)
    if select_BQ is not None and not inside:
        h = take_columns(h, select_BQ)
    return h, cache


def _layer_modules(layers: nnx.Module, matrices_dtype=None) -> list[nnx.Module]:
    """One module per layer, its parameters sliced out of the stacked [L, ...] arrays (their
    logical axis names lose the leading 'layers'); with matrices_dtype, the arrays of 2 or
    more dims per layer are cast to it. Layers already one module each are only cast."""
    if isinstance(layers, nnx.List):
        return [_cast_matrices(layer, matrices_dtype) for layer in layers]
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def one(var: nnx.Variable, layer: int) -> nnx.Variable:
        names = var.get_metadata().get("out_sharding")
        return var.replace(var[...][layer], **({"out_sharding": tuple(names)[1:]} if names else {}))
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return [_cast_matrices(nnx.merge(graphdef, jax.tree.map(lambda v: one(v, layer), state,
                                                            is_leaf=is_var)), matrices_dtype)
            for layer in range(num_layers)]


def _is_matrix(x, stacked: bool = False) -> bool:
    """The arrays of a layer that `matrices_dtype` casts: projection weights and per-head biases
    (>= 2 dims per layer; `stacked`: x holds every layer on a leading axis)."""
    return x.ndim - stacked >= 2


def _cast_matrices(layer: nnx.Module, dtype) -> nnx.Module:
    """The layer with its matrices (`_is_matrix`) in `dtype` (None: as they are)."""
    if dtype is None:
        return layer
    graphdef, state = nnx.split(layer)
    cast = lambda x: x.astype(dtype) if _is_matrix(x) else x  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(cast, state))


def is_unstacked(model: nnx.Module, matrices_dtype=None) -> bool:
    """Whether `unstack_layers(model, matrices_dtype)` would change nothing: the layers are
    one module each and (with matrices_dtype) their matrices are in it already."""
    if not isinstance(model.layers, nnx.List):
        return False
    return matrices_dtype is None or all(
        x.dtype == matrices_dtype for x in jax.tree.leaves(nnx.state(model.layers)) if _is_matrix(x))


def unstack_layers(model: nnx.Module, matrices_dtype=None) -> nnx.Module:
    """The same model with `model.layers` as one module per layer (an `nnx.List`), sliced
    out of the stacked parameters once (layers already unstacked are kept, only cast).

    For loops that run the model many times (decoding): every later call reads each layer's
    weights in place, where the stacked form makes XLA:CPU copy a layer's slice out of the
    [L, ...] arrays at every call.
    matrices_dtype: also cast each layer's arrays of >= 2 dims (projection weights, per-head
    biases) to this dtype in the same copy; pass the compute dtype, which every block casts
    them to at each use, so no number changes and a bf16 decode step reads half the bytes. The
    1-D ones (norm scales, which GPT-2 applies in fp32, and vector biases) stay as they are.
    """
    model.layers = nnx.List(_layer_modules(model.layers, matrices_dtype))
    return model


def frozen_forward_params(model: nnx.Module) -> nnx.State:
    """A copy of `model`'s parameters for a frozen model that only runs forward (the DPO
    reference): the arrays every use casts to the compute dtype — each layer's matrices
    (`_is_matrix`) and the top-level ones the model lists in `CAST_AT_USE` (Llama's embedding
    and LM head) — are stored in it, the rest (norm scales, vector biases, GPT-2's embeddings)
    copied as they are, each keeping its sharding. The forward is bit-identical to the
    original's (tested); with bf16 compute and fp32 params the copy holds about half the bytes."""
    dtype, stacked = model.cfg.compute_dtype, not isinstance(model.layers, nnx.List)

    def one(path, x):
        top = str(getattr(path[0], "key", path[0]))
        cast = _is_matrix(x, stacked) if top == "layers" else top in model.CAST_AT_USE
        return x.astype(dtype) if cast and x.dtype != dtype else x.copy()  # never x itself
    return jax.tree_util.tree_map_with_path(one, nnx.state(model))

