"""What every model family shares: the config, the KV cache, attention, RoPE and the layer loop.

Shape legend (used in names across the package):
  B batch, T time (new tokens), S cache/key length, L layers, D model width, N query heads,
  K kv heads, H head dim, F mlp width, V vocab, P max learned positions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

SHAPE_LEGEND = {
    "B": "batch", "T": "time (new tokens)", "S": "cache / key length", "L": "layers",
    "D": "model width", "N": "query heads", "K": "kv heads", "H": "head dim",
    "F": "mlp width", "V": "vocab", "P": "max learned positions",
}

RematPolicy = Literal["none", "full", "dots_saveable"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder LM; `arch` picks the module family ('gpt2' or 'llama').

    `hf_model_type` remembers which HF flavour it came from ('gpt2', 'llama', 'mistral',
    'qwen2') so that export writes the same `model_type` back.
    """
    arch: Literal["gpt2", "llama"]
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float
    max_positions: int
    hf_model_type: str = "llama"
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Compute dtype (activations, matmuls), parameter dtype (master weights). Logits are fp32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: RematPolicy = "none"
    # Unroll the layer scan of the no-cache forward (training, scoring): faster on XLA:CPU (no
    # stacked per-layer residual buffers); compile time grows with depth. With a KV cache the
    # layers always run as a Python loop, each reading its own cache arrays (`run_layers`).
    unroll_layers: bool = False
    # jax.nn.dot_product_attention implementation: None lets JAX pick (xla on CPU/TPU).
    attn_implementation: Literal["xla", "cudnn"] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ValueError(f"remat={self.remat!r}; choose 'none', 'full' or 'dots_saveable'")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def param(init: Callable, key: jax.Array, shape: tuple[int, ...], dtype, names: tuple[str, ...]):
    """A parameter carrying its logical axis names (sharding is a rules table over these)."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match shape {shape}")
    return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


# --------------------------------------------------------------------------------------------
# KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for S slots; rows of a batch share the write index.

    Left-padded prompts keep rows aligned: padding slots are simply not `valid`, and each
    slot remembers the position of the token it holds, so causality is `pos_k <= pos_q`.
      k, v: one [B, K, S, H] array per layer (tuples of L): the layout the decode einsums
        read as they are. One stacked [L, ...] array would make XLA:CPU copy a layer's slice
        out of it for every read (a dynamic slice per layer and step: ~40% of a decode step
        at the anchor shape, bench/README.md);
      positions: int32 [B, S]; valid: bool [B, S]; length: int32 [];
      empty: static, True for a cache nothing was written to yet (`init`): its first call
        (the prefill) attends over the new tokens alone, not over S mostly empty slots.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: jax.Array
    valid: jax.Array
    length: jax.Array
    empty: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros(), v=zeros(),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   valid=jnp.zeros((batch, max_len), bool),
                   length=jnp.zeros((), jnp.int32), empty=True)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KeyInfo:
    """What attention needs to know about the keys: where they sit and whether they are real.

    positions_BS, valid_BS describe the S keys (with a cache: all its slots, the new tokens
    written in); `write_at` is the cache slot of the first new token (None without a cache);
    segments_BS: the keys' segment ids (see `key_info`) or None; prefill: static, the cache was
    empty, so attention needs only its first T slots, the new tokens.
    """
    positions_BS: jax.Array
    valid_BS: jax.Array
    write_at: jax.Array | int | None
    segments_BS: jax.Array | None = None
    prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))


SHARED_SEGMENT = 1  # segment id of a prefix that every other segment of its row attends to


def key_info(positions_BT, attention_mask_BT, cache: KVCache | None, segments_BT=None) -> KeyInfo:
    """attention_mask_BT: bool, True = real token. segments_BT (no cache only): int segment
    ids, 0 padding, SHARED_SEGMENT (1) a prefix every token of the row may attend to, k >= 2
    tokens that attend only to their own segment and the shared prefix. Segments let one row
    hold a prompt once and several continuations of it (DPO's chosen and rejected, each with
    positions counted from the prompt's end); causality still follows the positions."""
    if cache is None:
        return KeyInfo(positions_BT, attention_mask_BT.astype(bool), None, segments_BT)
    if segments_BT is not None:
        raise ValueError("segments_BT works without a KV cache only")
    start = 0 if cache.empty else cache.length
    pos = jax.lax.dynamic_update_slice(cache.positions, positions_BT.astype(jnp.int32), (0, start))
    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask_BT.astype(bool), (0, start))
    return KeyInfo(pos, valid, start, prefill=cache.empty)


def attention_mask_BTS(cfg: ModelConfig, positions_BT, keys: KeyInfo):
    """bool [B, T, S]: key s is real, not in the future of query t, inside the window and (with
    segments) in t's segment or the shared prefix. At a prefill S = T: the new tokens alone."""
    k_pos, k_valid = keys.positions_BS, keys.valid_BS
    if keys.prefill:
        k_pos, k_valid = k_pos[:, :positions_BT.shape[1]], k_valid[:, :positions_BT.shape[1]]
    q = positions_BT[:, :, None]
    k = k_pos[:, None, :]
    mask = k_valid[:, None, :] & (k <= q)
    if cfg.sliding_window is not None:
        mask &= (q - k) < cfg.sliding_window
    if keys.segments_BS is not None:  # no cache: the queries are the keys
        seg_q, seg_k = keys.segments_BS[:, :, None], keys.segments_BS[:, None, :]
        mask &= (seg_k == SHARED_SEGMENT) | (seg_k == seg_q)
    return mask


def attend(cfg: ModelConfig, q_BTNH, k_BTKH, v_BTKH, mask_BTS, keys: KeyInfo, kv_cache):
    """Attention of the new tokens; with a cache, their keys/values are written into it first.

    kv_cache: None, or this layer's (k_BKSH, v_BKSH). Returns (out_BTNH, None or the updated
    (k_BKSH, v_BKSH)).
    Without a cache (training, scoring) this is `jax.nn.dot_product_attention`
    (`cfg.attn_implementation` picks cudnn/xla). With one, two einsums read the cache in its
    stored [B, K, S, H] layout: dot_product_attention wants [B, S, K, H] and XLA would
    transpose the whole cache at every decode step (measured 1.6x slower decoding on CPU). A
    prefill reads the just-written first T slots the same way, which skips the transposes
    dot_product_attention makes of q, k and v (anchor prefill ~54 -> ~52 ms, interleaved).
    """
    if kv_cache is None:
        return jax.nn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, mask=mask_BTS[:, None],
            implementation=cfg.attn_implementation), None
    k_BKSH, v_BKSH = kv_cache
    at = (0, 0, keys.write_at, 0)
    k_BKSH = jax.lax.dynamic_update_slice(k_BKSH, k_BTKH.swapaxes(1, 2).astype(k_BKSH.dtype), at)
    v_BKSH = jax.lax.dynamic_update_slice(v_BKSH, v_BTKH.swapaxes(1, 2).astype(v_BKSH.dtype), at)
    # A prefill's keys are the new tokens, the first T slots (the queries may be fewer:
    # `select_queries`); a decode step reads every slot, masked.
    S = k_BTKH.shape[1] if keys.prefill else k_BKSH.shape[2]
    out = cached_attention(q_BTNH, k_BKSH[:, :, :S], v_BKSH[:, :, :S], mask_BTS)
    return out, (k_BKSH, v_BKSH)


def cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS):
    """Softmax attention over a cache laid out [B, K, S, H]; grouped queries share a kv head."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    k, v = k_BKSH.astype(q.dtype), v_BKSH.astype(q.dtype)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) / np.sqrt(H)
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    # Batch axes first in both outputs: XLA:CPU then reads the cache rows in place (K·qᵀ and
    # P·V); with the output as [B, T, K, G, H] it computed (P·V)ᵀ, striding through V (SmolLM2
    # decode, G = 3: 10.9 -> 1.4 ms per step).
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# --------------------------------------------------------------------------------------------
# Matmuls with a hand-written backward


def _accumulation(x):
    """fp32 accumulation for low-precision operands; None keeps an fp32 einsum as it is."""
    return None if x.dtype == jnp.float32 else jnp.float32


def dense(spec: str, x, w):
    """`einsum(spec, x, w)` in x's dtype, accumulated in fp32 (a projection: x activations, w weights).

    Why a custom VJP (measured on XLA:CPU, bench/README.md): a bf16 matmul runs natively
    (YNNPACK, ~2x fp32) only as bf16 x bf16 -> fp32, while autodiff of a bf16 einsum yields
    bf16-output and fp32 x bf16 matmuls that XLA upcasts to fp32; and in fp32 autodiff leaves
    the weight gradient xᵀ·g in a transposed form YNNPACK does not take (XLA's generic dot,
    ~1.7x slower). The backward below spells out dx = g·wᵀ and dw = xᵀ·g, with the cotangent
    cast to the compute dtype (as torch autocast does). fp32 numbers are unchanged. The output
    is named "dense" so that remat="dots_saveable" keeps it, as it keeps a plain matmul's.
    """
    return checkpoint_name(_matmul(spec, None, x, w), "dense")


def unembed(h_BTD, w_VD):
    """fp32 logits h·Wᵀ [B, T, V]; the backward matmuls run in h's dtype (see `dense`)."""
    return _matmul("BTD,VD->BTV", jnp.float32, h_BTD, w_VD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul(spec: str, out_dtype, x, w):
    """einsum(spec, x, w) accumulated in fp32, returned in out_dtype (None: x's dtype)."""
    return _einsum_flat(spec, x, w, _accumulation(x)).astype(out_dtype or x.dtype)


def _einsum_flat(spec: str, x, w, accumulation):
    """einsum(spec, x, w), with several contracting axes that end x and begin w, in the same
    order (the output projection's "BTNH,NHD->BTD"), merged into one: a plain matmul. Given the
    two axes, XLA:CPU transposed the weight at every call of the decode loop (SmolLM2: 4.4 ms
    of a 74 ms step). The reshapes stay inside `_matmul`, so its residuals are still the
    weights themselves (a layer scan forwards them instead of saving copies)."""
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    contracted = "".join(c for c in xs if c in ws and c not in out)
    n = len(contracted)
    if n < 2 or not (xs.endswith(contracted) and ws.startswith(contracted)):
        return jnp.einsum(spec, x, w, preferred_element_type=accumulation)
    merged = next(c for c in "ZYXWVUQPOM" if c not in spec)
    return jnp.einsum(f"{xs[:-n]}{merged},{merged}{ws[n:]}->{out}",
                      x.reshape(x.shape[:-n] + (-1,)), w.reshape((-1,) + w.shape[n:]),
                      preferred_element_type=accumulation)


def _matmul_fwd(spec, out_dtype, x, w):
    return _matmul(spec, out_dtype, x, w), (x, w)


def _matmul_bwd(spec, out_dtype, res, g):
    x, w = res
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g = g.astype(x.dtype)
    acc = _accumulation(x)
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w, preferred_element_type=acc).astype(x.dtype)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=acc).astype(w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def scale(x_BTD, w_D):
    """x · w broadcast over [B, T] (a norm's learned scale), with the weight gradient
    Σ_BT g·x written as a matrix-vector product: XLA:CPU lowers the plain reduction over two
    axes of a large activation to a slow tree of reduce-windows inside a training step."""
    return x_BTD * w_D.astype(x_BTD.dtype)[None, None]


def _scale_fwd(x_BTD, w_D):
    return scale(x_BTD, w_D), (x_BTD, w_D)


def _scale_bwd(res, g_BTD):
    x_BTD, w_D = res
    gx = (g_BTD * x_BTD).reshape(-1, x_BTD.shape[-1])
    ones = jnp.ones(gx.shape[:1], gx.dtype)
    dw = jnp.einsum("N,ND->D", ones, gx, preferred_element_type=jnp.float32)
    return (g_BTD * w_D.astype(g_BTD.dtype)[None, None]).astype(x_BTD.dtype), dw.astype(w_D.dtype)


scale.defvjp(_scale_fwd, _scale_bwd)


# --------------------------------------------------------------------------------------------
# Rotary position embedding (HF "rotate_half" convention)


def rope_table(positions_BT, head_dim: int, theta: float):
    """(cos, sin) [B, T, H] in fp32, computed once per forward and shared by every layer (the
    transcendentals, fused into each layer's q and k instead, cost more than the rotation)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    # Passing cos/sin through an (exact, fp32) identity matmul makes XLA materialise them: a
    # matmul result is never re-fused, while plain cos/sin were fused back into, and recomputed
    # by, every q/k consumer (each layer, forward and backward, once per head): −5% step time.
    eye = jnp.eye(head_dim, dtype=jnp.float32)
    return (jnp.einsum("BTH,HG->BTG", jnp.cos(angles), eye, precision="highest"),
            jnp.einsum("BTH,HG->BTG", jnp.sin(angles), eye, precision="highest"))


def rope(x_BTNH, table):
    """Rotates the first and second halves of the head dim by position-dependent angles."""
    cos_BTH, sin_BTH = table
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]).astype(x_BTNH.dtype)


# --------------------------------------------------------------------------------------------
# Stacked layers: built with nnx.vmap (a leading 'layers' axis); run with lax.scan, or (with a
# KV cache, or unstacked) as a Python loop over per-layer modules.


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
                         "gather after it (common.final_hidden does)")
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
        # Unrolled, no [L, ...] stacked residual buffers for XLA:CPU to update by copying
        # (measured 4–24% less step time at SmolLM2-135M size, ~7% at the anchor shape;
        # compile 5 s → 11 s for 30 layers; bench/results/).
        if select_BQ is None:
            return jax.lax.scan(body, h_BTD, state, unroll=bool(cfg.unroll_layers))[0], None
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


def last_layer_selects(cfg: ModelConfig, layers: nnx.Module, cache: KVCache | None) -> bool:
    """Whether `run_layers` runs the last layer at select_BQ's columns alone: with a cache,
    unstacked layers or an unrolled scan. A rolled scan returns every column instead."""
    return cache is not None or isinstance(layers, nnx.List) or bool(cfg.unroll_layers)


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
    [L, ...] arrays at every call (measured: ~1 ms of a 4 ms anchor decode step).
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


def logits_from_hidden(h_BTD, unembed_VD):
    """fp32 logits: the last matmul accumulates in fp32 whatever the compute dtype."""
    return unembed(h_BTD, unembed_VD.astype(h_BTD.dtype))


def dtype_of(name: str | Any):
    return jnp.dtype(name)
