"""The Llama family (Llama-2, Mistral, Qwen2, SmolLM2) as one Flax NNX module with explicit switches.

Switches: GQA (`num_kv_heads`), `head_dim`, RoPE theta, RMSNorm eps, q/k/v bias (Qwen2), tied
or untied embeddings, and Mistral's sliding window (enforced in the attention mask).
Reads like HF's `modeling_llama.py`: pre-norm blocks, RoPE on q and k, SwiGLU MLP.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdpo_jax.models import attention, heads, layers, ops, rope
from pdpo_jax.models.attention import KVCache
from pdpo_jax.models.config import ModelConfig, param

_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


def rms_norm(x_BTD, scale_D, eps: float):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return ops.scale(x.astype(x_BTD.dtype), scale_D)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.params_dtype
        self.q_DNH = param(_normal, rngs.params(), (D, N, H), pd, ("embed", "heads", "head_dim"))
        self.k_DKH = param(_normal, rngs.params(), (D, K, H), pd, ("embed", "kv_heads", "head_dim"))
        self.v_DKH = param(_normal, rngs.params(), (D, K, H), pd, ("embed", "kv_heads", "head_dim"))
        self.o_NHD = param(_normal, rngs.params(), (N, H, D), pd, ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias_NH = param(_zeros, rngs.params(), (N, H), pd, ("heads", "head_dim"))
            self.k_bias_KH = param(_zeros, rngs.params(), (K, H), pd, ("kv_heads", "head_dim"))
            self.v_bias_KH = param(_zeros, rngs.params(), (K, H), pd, ("kv_heads", "head_dim"))

    def __call__(self, x_BTD, rope_table, mask_BTS, keys, kv_cache, select_BQ=None):
        """Keys and values of every column; queries (and the output) at select_BQ's columns
        only when it is given (`layers.run_layers`), T of them otherwise."""
        cfg, dt = self.cfg, x_BTD.dtype
        x_BQD, table_q, mask_BQS = layers.select_queries(select_BQ, x_BTD, rope_table, mask_BTS)
        q = ops.dense("BTD,DNH->BTNH", x_BQD, self.q_DNH[...].astype(dt))
        k = ops.dense("BTD,DKH->BTKH", x_BTD, self.k_DKH[...].astype(dt))
        v = ops.dense("BTD,DKH->BTKH", x_BTD, self.v_DKH[...].astype(dt))
        if cfg.qkv_bias:
            q = q + self.q_bias_NH[...].astype(dt)[None, None]
            k = k + self.k_bias_KH[...].astype(dt)[None, None]
            v = v + self.v_bias_KH[...].astype(dt)[None, None]
        q = rope.rope(q, table_q)
        k = rope.rope(k, rope_table)
        out_BQNH, kv_cache = attention.attend(cfg, q, k, v, mask_BQS, keys, kv_cache)
        return ops.dense("BTNH,NHD->BTD", out_BQNH, self.o_NHD[...].astype(dt)), kv_cache


class Mlp(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pd = cfg.d_model, cfg.mlp_dim, cfg.params_dtype
        self.gate_DF = param(_normal, rngs.params(), (D, F), pd, ("embed", "mlp"))
        self.up_DF = param(_normal, rngs.params(), (D, F), pd, ("embed", "mlp"))
        self.down_FD = param(_normal, rngs.params(), (F, D), pd, ("mlp", "embed"))

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        gate = ops.dense("BTD,DF->BTF", x_BTD, self.gate_DF[...].astype(dt))
        up = ops.dense("BTD,DF->BTF", x_BTD, self.up_DF[...].astype(dt))
        return ops.dense("BTF,FD->BTD", ops.swiglu(gate, up), self.down_FD[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, pd = cfg.d_model, cfg.params_dtype
        self.attn_norm_D = param(_ones, rngs.params(), (D,), pd, ("norm",))
        self.attn = Attention(cfg, rngs)
        self.mlp_norm_D = param(_ones, rngs.params(), (D,), pd, ("norm",))
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, h_BTD, rope_table, mask_BTS, keys, kv_cache, select_BQ=None):
        """One pre-norm block; with select_BQ, the output is [B, Q, D] at those columns."""
        eps = self.cfg.norm_eps
        attn_out, kv_cache = self.attn(rms_norm(h_BTD, self.attn_norm_D[...], eps),
                                       rope_table, mask_BTS, keys, kv_cache, select_BQ)
        if select_BQ is not None:
            h_BTD = layers.take_columns(h_BTD, select_BQ)
        h_BTD = h_BTD + attn_out
        h_BTD = h_BTD + self.mlp(rms_norm(h_BTD, self.mlp_norm_D[...], eps))
        return h_BTD, kv_cache


class Llama(nnx.Module):
    """Decoder LM: `logits_BTV, cache = model(tokens_BT, positions_BT, attention_mask_BT, cache)`."""

    # top-level parameters every use casts to the compute dtype (`frozen_forward_params`): the
    # embedding rows after the gather, the LM head (or the tied embedding) at the logits
    CAST_AT_USE = ("embed_VD", "lm_head_VD")

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.arch != "llama":
            raise ValueError(f"Llama needs cfg.arch='llama', got {cfg.arch!r}")
        self.cfg = cfg
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.params_dtype
        self.embed_VD = param(_normal, rngs.params(), (V, D), pd, ("vocab", "embed"))
        self.layers = layers.make_stacked_layers(lambda r: Block(cfg, r), cfg.num_layers, rngs)
        self.final_norm_D = param(_ones, rngs.params(), (D,), pd, ("norm",))
        if cfg.labels:  # a sequence classifier: a score head instead of the LM head
            self.score_DC = param(_normal, rngs.params(), (D, len(cfg.labels)), pd, ("embed", "labels"))
        elif not cfg.tie_embeddings:
            self.lm_head_VD = param(_normal, rngs.params(), (V, D), pd, ("vocab", "embed"))

    def unembedding_VD(self) -> jax.Array:
        return self.embed_VD[...] if self.cfg.tie_embeddings else self.lm_head_VD[...]

    def hidden_states(self, tokens_BT, positions_BT, attention_mask_BT, cache: KVCache | None = None,
                      segments_BT=None, select_BQ=None):
        """Final-norm hidden states [B, T, D] in the compute dtype, and the updated cache.
        segments_BT: int segment ids, no cache (see `attention.key_info`). select_BQ: int [B, Q],
        return [B, Q, D] at those columns only, computed with less work (`layers.run_layers`)."""
        cfg = self.cfg
        h = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(cfg.compute_dtype)
        table = rope.rope_table(positions_BT, cfg.head_dim, cfg.rope_theta)
        return layers.final_hidden(
            cfg, self.layers, h, positions_BT, attention_mask_BT, cache,
            lambda h: rms_norm(h, self.final_norm_D[...], cfg.norm_eps), select_BQ=select_BQ,
            per_position=table, segments_BT=segments_BT)

    def classify(self, tokens_BT, positions_BT, attention_mask_BT, token_types_BT=None):
        """Sequence classifier (cfg.labels): fp32 logits [B, C] at each row's last real token
        (HF `…ForSequenceClassification`). token_types_BT: ignored (decoders have none)."""
        return heads.decoder_classify(self, tokens_BT, positions_BT, attention_mask_BT)

    def __call__(self, tokens_BT, positions_BT, attention_mask_BT, cache: KVCache | None = None):
        h, cache = self.hidden_states(tokens_BT, positions_BT, attention_mask_BT, cache)
        return ops.logits_from_hidden(h, self.unembedding_VD()), cache
