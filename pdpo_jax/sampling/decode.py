"""What every decode loop shares: the weights in the layout decoding reads (`DecodeWeights`),
the prefill, each row's random key, the end-of-sequence test and the reported log-prob.

The static sampler (`sampler.py`) and the continuous-batching engine (`engine.py`) both build
on these, so a row gets the same prefill logits, the same key and the same tokens in either.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pdpo_jax import sharding as shd
from pdpo_jax.models.attention import KVCache
from pdpo_jax.models.layers import is_unstacked, unstack_layers
from pdpo_jax.models.ops import logits_from_hidden


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeWeights:
    """The weights in the layout a decode loop reads, made once per set of params.

    params: the model's state with its layers unstacked, one weight array per layer (from the
    stacked [L, ...] arrays XLA:CPU would copy every layer's slice out at every decode step),
    and their matrices cast to the compute dtype (bf16 compute with fp32 params then reads half
    the bytes and casts nothing per step); `decode_graph` gives its graph.
    head_DV: the LM head as [D, V] in the compute dtype, the layout a one-token matmul reads
    fastest.
    """
    params: nnx.State
    head_DV: jax.Array


def decode_model(model: nnx.Module) -> nnx.Module:
    """`model` as generation runs it: `unstack_layers`, matrices in the compute dtype."""
    return unstack_layers(model, matrices_dtype=model.cfg.compute_dtype)


def in_decode_layout(model: nnx.Module) -> bool:
    """Whether `decode_model` would change nothing (`from_pretrained(stack_layers=False)` with
    param_dtype = dtype)."""
    return is_unstacked(model, matrices_dtype=model.cfg.compute_dtype)


def decode_graph(graphdef: nnx.GraphDef, params) -> nnx.GraphDef:
    """The graph of `DecodeWeights.params` made from a model of (graphdef, params)."""
    return nnx.split(nnx.eval_shape(lambda p: decode_model(nnx.merge(graphdef, p)), params))[0]


@functools.partial(jax.jit, static_argnums=0)
def _decode_head(graphdef: nnx.GraphDef, params) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model.unembedding_VD().T.astype(model.cfg.compute_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _decode_weights(graphdef: nnx.GraphDef, params) -> DecodeWeights:
    model = decode_model(nnx.merge(graphdef, params))
    return DecodeWeights(nnx.split(model)[1], _decode_head(graphdef, params))


def make_decode_weights(graphdef: nnx.GraphDef, params, mesh: Mesh | None = None) -> DecodeWeights:
    """params (of the model's structure), placed on the mesh by `SAMPLING_RULES`, in the decode
    layout. Params already in it are used as they are (jit would copy them); only the head is made."""
    if mesh is not None:
        params = jax.device_put(params, shd.tree_shardings(params, mesh, shd.SAMPLING_RULES))
    if in_decode_layout(nnx.merge(graphdef, params)):
        return DecodeWeights(params, _decode_head(graphdef, params))
    return _decode_weights(graphdef, params)


def prefill(model: nnx.Module, tokens_BP, mask_BP, cache_len: int, mesh: Mesh | None = None):
    """One model call over left-padded prompts into a fresh cache of `cache_len` slots.

    Returns (fp32 logits of each row's last prompt token [B, V], the cache, the position of each
    row's next token int32 [B]). Positions count from each row's first real token; left padding
    puts every row's last token in the last column, so only its hidden state is computed there
    (the last layer and the LM head run on that column alone).
    """
    B, P = tokens_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1, dtype=jnp.int32) - 1, 0)
    cache = constrain_cache(KVCache.init(model.cfg, B, cache_len), mesh)
    last_B1 = jnp.full((B, 1), P - 1, jnp.int32)
    h_B1D, cache = model.hidden_states(tokens_BP, positions_BP, mask_BP, cache, select_BQ=last_B1)
    logits_BV = logits_from_hidden(h_B1D, model.unembedding_VD())[:, 0]
    return logits_BV, cache, jnp.sum(mask_BP, axis=1, dtype=jnp.int32)


def decode_logits(weights: DecodeWeights, h_B1D) -> jax.Array:
    """fp32 logits [B, V] of one new token per row from its final hidden state."""
    return jnp.einsum("BD,DV->BV", h_B1D[:, 0], weights.head_DV, preferred_element_type=jnp.float32)


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Rows over data x fsdp and kv heads over tensor, as the sampling rules say."""
    if mesh is None:
        return cache
    kv = _sharding(mesh, ("batch", "kv_heads", None, "head_dim"), cache.k[0].shape)
    rows = _sharding(mesh, ("batch", None), cache.positions.shape)
    wsc = jax.lax.with_sharding_constraint
    return KVCache(k=tuple(wsc(k, kv) for k in cache.k), v=tuple(wsc(v, kv) for v in cache.v),
                   positions=wsc(cache.positions, rows), valid=wsc(cache.valid, rows),
                   length=cache.length, empty=cache.empty)


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """A per-row array [B, ...] of a decode loop: rows over data x fsdp."""
    return _sharding(mesh, ("batch",) + (None,) * (ndim - 1), None)


def _sharding(mesh: Mesh, names, shape) -> NamedSharding:
    return NamedSharding(mesh, shd.logical_to_spec(names, shape, rules=shd.SAMPLING_RULES, mesh=mesh))


def check_seed(seed) -> int:
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32): it becomes a uint32 traced value")
    return int(seed)


def row_key(seed, example_id, sample):
    """The PRNG key of sample `sample` of example `example_id`:
    fold_in(fold_in(key(seed), example id), sample index). Token t of the row then draws with
    fold_in(row key, t): a row's samples never depend on its batch, slot or neighbours."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), example_id), sample)


def is_eos(token_B, eos_ids: tuple[int, ...]):
    if not eos_ids:
        return jnp.zeros(token_B.shape, bool)
    return jnp.any(token_B[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=1)


def chosen_logprob(logits_BV, token_B):
    """fp32 [B]: log p(token) under the model's own distribution (temperature 1, no filters),
    the quantity the training step's `response_logps` computes for the same token."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, token_B[:, None], axis=1)[:, 0]
