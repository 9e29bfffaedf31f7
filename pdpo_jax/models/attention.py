"""Attention: the KV cache, which keys each query may see, and the softmax attention itself."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pdpo_jax.models import ops
from pdpo_jax.models.config import ModelConfig

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for S slots; rows of a batch share the write index.

    Left-padded prompts keep rows aligned: padding slots are simply not `valid`, and each
    slot remembers the position of the token it holds, so causality is `pos_k <= pos_q`.
      k, v: one [B, K, S, H] array per layer (tuples of L): the layout the decode einsums
        read as they are. One stacked [L, ...] array would make XLA:CPU copy a layer's slice
        out of it for every read (a dynamic slice per layer and step);
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


# Segment ids pack several sequences into one row: id = group * SEGMENT_PARTS + part, 0 padding.
# A group is one record (or one prompt with its continuations); part 0 is the group's prefix,
# which every part of the group sees; part p >= 1 sees its own tokens and the prefix. Groups
# never see each other. (A DPO pair is group g: prompt part 0, chosen part 1, rejected part 2.)
SEGMENT_PARTS = 64
# With a KV cache, segments describe the new tokens; what the cache held before is a prefix
# every segment sees (Dialogue-NLI: one example's prompt, cached once, and its candidates).
CACHED_PREFIX = -1


def segment_id(group: int, part: int) -> int:
    """The segment id of `part` (0: the prefix) of `group` (>= 1)."""
    if group < 1 or not 0 <= part < SEGMENT_PARTS:
        raise ValueError(f"segment group {group} must be >= 1 and part {part} in [0, {SEGMENT_PARTS})")
    return group * SEGMENT_PARTS + part


def key_info(positions_BT, attention_mask_BT, cache: KVCache | None, segments_BT=None) -> KeyInfo:
    """attention_mask_BT: bool, True = real token. segments_BT: int segment ids (`segment_id`:
    0 padding; a token sees its group's prefix and its own part). Segments let one row hold a
    prompt once and several continuations of it (DPO's chosen and rejected, each with positions
    counted from the prompt's end), or several records side by side (each its own group,
    positions from 0); causality still follows the positions. With a (non-empty) cache the
    segments are the new tokens', and every slot the cache already held is a prefix all of them
    see (`CACHED_PREFIX`)."""
    if cache is None:
        return KeyInfo(positions_BT, attention_mask_BT.astype(bool), None, segments_BT)
    start = 0 if cache.empty else cache.length
    pos = jax.lax.dynamic_update_slice(cache.positions, positions_BT.astype(jnp.int32), (0, start))
    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask_BT.astype(bool), (0, start))
    segments = None
    if segments_BT is not None:
        if cache.empty:
            raise ValueError("segments_BT with a KV cache need a cache holding their prefix")
        segments = jax.lax.dynamic_update_slice(
            jnp.full(cache.valid.shape, CACHED_PREFIX, jnp.int32), segments_BT.astype(jnp.int32),
            (0, start))
    return KeyInfo(pos, valid, start, segments, prefill=cache.empty)


def attention_mask_BTS(cfg: ModelConfig, positions_BT, keys: KeyInfo):
    """bool [B, T, S]: key s is real, not in the future of query t (decoders: `cfg.causal`),
    inside the window and (with segments) in t's segment or the shared prefix. At a prefill
    S = T: the new tokens alone."""
    k_pos, k_valid = keys.positions_BS, keys.valid_BS
    if keys.prefill:
        k_pos, k_valid = k_pos[:, :positions_BT.shape[1]], k_valid[:, :positions_BT.shape[1]]
    q = positions_BT[:, :, None]
    k = k_pos[:, None, :]
    if cfg.causal:
        mask = k_valid[:, None, :] & (k <= q)
    else:  # an encoder: every real key, whatever its position
        mask = jnp.broadcast_to(k_valid[:, None, :], (*positions_BT.shape, k_valid.shape[1]))
    if cfg.sliding_window is not None:
        mask &= (q - k) < cfg.sliding_window
    if keys.segments_BS is not None:
        # The queries' segments: the keys' own without a cache, else the slots just written.
        seg_q = keys.segments_BS if keys.write_at is None else jax.lax.dynamic_slice_in_dim(
            keys.segments_BS, keys.write_at, positions_BT.shape[1], axis=1)
        seg_q = seg_q[:, :, None]
        seg_k = keys.segments_BS[:, None, :]
        same_group = (seg_q // SEGMENT_PARTS) == (seg_k // SEGMENT_PARTS)
        part_k = seg_k % SEGMENT_PARTS
        mask &= (same_group & ((part_k == 0) | (seg_k == seg_q))) | (seg_k == CACHED_PREFIX)
    return mask


def attend(cfg: ModelConfig, q_BTNH, k_BTKH, v_BTKH, mask_BTS, keys: KeyInfo, kv_cache):
    """Attention of the new tokens; with a cache, their keys/values are written into it first.

    kv_cache: None, or this layer's (k_BKSH, v_BKSH). Returns (out_BTNH, None or the updated
    (k_BKSH, v_BKSH)).
    Without a cache (training, scoring) this is `jax.nn.dot_product_attention` on a GPU (its
    cuDNN kernel where `cfg.attn_implementation` asks for it) and elsewhere that function's
    XLA path as `softmax_attention`, whose backward keeps q, k and v, not [T, S] arrays. With
    a cache, two einsums read the cache in its stored [B, K, S, H] layout: dot_product_attention wants [B, S, K, H] and XLA would
    transpose the whole cache at every decode step. A prefill reads the just-written first T
    slots the same way, which skips the transposes dot_product_attention makes of q, k and v.
    """
    if kv_cache is None:
        if cfg.attn_implementation == "cudnn" or jax.default_backend() == "gpu":
            return jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, mask=mask_BTS[:, None],
                implementation=cfg.attn_implementation), None
        return softmax_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS), None
    k_BKSH, v_BKSH = kv_cache
    at = (0, 0, keys.write_at, 0)
    k_BKSH = jax.lax.dynamic_update_slice(k_BKSH, k_BTKH.swapaxes(1, 2).astype(k_BKSH.dtype), at)
    v_BKSH = jax.lax.dynamic_update_slice(v_BKSH, v_BTKH.swapaxes(1, 2).astype(v_BKSH.dtype), at)
    # A prefill's keys are the new tokens, the first T slots (the queries may be fewer:
    # `select_queries`); a decode step reads every slot, masked.
    S = k_BTKH.shape[1] if keys.prefill else k_BKSH.shape[2]
    out = cached_attention(q_BTNH, k_BKSH[:, :, :S], v_BKSH[:, :, :S], mask_BTS)
    return out, (k_BKSH, v_BKSH)


def _scores(q_BTKGH, k_BSKH, mask_BTS):
    """Scaled q·k in fp32, masked: jax.nn.dot_product_attention's XLA path, op for op."""
    precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BTKGH.dtype == jnp.bfloat16
                 else None)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, precision=precision,
                        preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1 / np.sqrt(q_BTKGH.shape[-1]))
    return jnp.where(mask_BTS[:, None, None], scores, -0.7 * jnp.finfo(jnp.float32).max)


def _probabilities(q_BTKGH, k_BSKH, mask_BTS):
    return jax.nn.softmax(_scores(q_BTKGH, k_BSKH, mask_BTS), axis=-1)


def _softmax_attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    B, T, N, H = q_BTNH.shape
    q = q_BTNH.reshape(B, T, k_BSKH.shape[2], N // k_BSKH.shape[2], H)
    probs = _probabilities(q, k_BSKH, mask_BTS)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH).reshape(B, T, N, H)
    return out, (q, k_BSKH, v_BSKH, mask_BTS)


@jax.custom_vjp
def softmax_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Grouped-query softmax attention without a cache, equal to jax.nn.dot_product_attention's
    XLA path (fp32 scores and softmax, probabilities cast to v's dtype), with the gradients
    differentiating that path gives (in bf16, P·V's are accumulated from the fp32
    probabilities, so they are if anything closer).

    What differs is what the backward keeps: q, k, v and the mask, as a fused attention
    kernel's backward does; it recomputes the probabilities. Autodiff of that path keeps three
    [B, N, T, S] fp32 arrays per layer on XLA:CPU (the scores, the probabilities, and P in v's
    dtype upcast for the matmul): SmolLM2-135M SFT step, 8 rows of 192 tokens, 3 × 294 MiB of
    its peak (`bench/memory_probe.py`)."""
    return _softmax_attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS)[0]


def _softmax_attention_bwd(saved, g_BTNH):
    q, k_BSKH, v_BSKH, mask_BTS = saved
    g = g_BTNH.reshape(q.shape)
    probs = _probabilities(ops.after_cotangent(q, g), k_BSKH, mask_BTS)
    # P·V's gradients from the fp32 probabilities, accumulated in fp32: autodiff would read
    # P in v's dtype, upcast to fp32 by XLA:CPU for the matmul
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", probs, g, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("BTKGH,BSKH->BKGTS", g, v_BSKH, preferred_element_type=jnp.float32)
    # softmax's own VJP, from its output alone
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    # the linear part of q, k -> scores: XLA drops the recomputed scores nobody reads
    _, scores_vjp = jax.vjp(lambda q, k: _scores(q, k, mask_BTS), q, k_BSKH)
    dq, dk = scores_vjp(d_scores)
    return dq.reshape(g_BTNH.shape), dk, dv.astype(v_BSKH.dtype), None


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


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
    # P·V); with the output as [B, T, K, G, H] it computed (P·V)ᵀ, striding through V.
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)

