"""GPT-2 as a Flax NNX module (also rinna's Japanese GPT-2 models, which share the architecture).

Learned positions, pre-LayerNorm blocks, fused q/k/v projection, gelu_new MLP, LM head tied to
the token embedding. Reads like HF's `modeling_gpt2.py`; Conv1D weights are [in, out] there and
here, with the head axes split out ([D, 3, N, H]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdpo_jax.models import attention, heads, layers, ops
from pdpo_jax.models.attention import KVCache
from pdpo_jax.models.config import ModelConfig, param

_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


def layer_norm(x_BTD, scale_D, bias_D, eps: float):
    x = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_D.astype(jnp.float32)[None, None] + bias_D.astype(jnp.float32)[None, None]).astype(x_BTD.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, pd = cfg.d_model, cfg.params_dtype
        self.eps = cfg.norm_eps
        self.scale_D = param(_ones, rngs.params(), (D,), pd, ("norm",))
        self.bias_D = param(_zeros, rngs.params(), (D,), pd, ("norm",))

    def __call__(self, x_BTD):
        return layer_norm(x_BTD, self.scale_D[...], self.bias_D[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, H, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.params_dtype
        self.qkv_D3NH = param(_normal, rngs.params(), (D, 3, N, H), pd,
                              ("embed", "qkv", "heads", "head_dim"))
        self.qkv_bias_3NH = param(_zeros, rngs.params(), (3, N, H), pd, ("qkv", "heads", "head_dim"))
        self.o_NHD = param(_normal, rngs.params(), (N, H, D), pd, ("heads", "head_dim", "embed"))
        self.o_bias_D = param(_zeros, rngs.params(), (D,), pd, ("bias",))

    def __call__(self, x_BTD, positions_BT, mask_BTS, keys, kv_cache, select_BQ=None):
        """Keys and values of every column; queries (and the output) at select_BQ's columns
        only when it is given (`layers.run_layers`), T of them otherwise."""
        dt = x_BTD.dtype
        w_D3NH, b_3NH = self.qkv_D3NH[...].astype(dt), self.qkv_bias_3NH[...].astype(dt)
        if select_BQ is None:
            qkv = ops.dense("BTD,DCNH->CBTNH", x_BTD, w_D3NH) + b_3NH[:, None, None]
            q, k, v, mask_BQS = qkv[0], qkv[1], qkv[2], mask_BTS
        else:
            x_BQD, _, mask_BQS = layers.select_queries(select_BQ, x_BTD, None, mask_BTS)
            q = ops.dense("BTD,DNH->BTNH", x_BQD, w_D3NH[:, 0]) + b_3NH[0][None, None]
            kv = ops.dense("BTD,DCNH->CBTNH", x_BTD, w_D3NH[:, 1:]) + b_3NH[1:, None, None]
            k, v = kv[0], kv[1]
        out_BQNH, kv_cache = attention.attend(self.cfg, q, k, v, mask_BQS, keys, kv_cache)
        out = ops.dense("BTNH,NHD->BTD", out_BQNH, self.o_NHD[...].astype(dt))
        return out + self.o_bias_D[...].astype(dt)[None, None], kv_cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pd = cfg.d_model, cfg.mlp_dim, cfg.params_dtype
        self.fc_DF = param(_normal, rngs.params(), (D, F), pd, ("embed", "mlp"))
        self.fc_bias_F = param(_zeros, rngs.params(), (F,), pd, ("mlp",))
        self.proj_FD = param(_normal, rngs.params(), (F, D), pd, ("mlp", "embed"))
        self.proj_bias_D = param(_zeros, rngs.params(), (D,), pd, ("bias",))

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        h = ops.dense("BTD,DF->BTF", x_BTD, self.fc_DF[...].astype(dt))
        h = jax.nn.gelu(h + self.fc_bias_F[...].astype(dt)[None, None],
                        approximate=True)  # gelu_new is the tanh approximation
        h = ops.dense("BTF,FD->BTD", h, self.proj_FD[...].astype(dt))
        return h + self.proj_bias_D[...].astype(dt)[None, None]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, h_BTD, positions_BT, mask_BTS, keys, kv_cache, select_BQ=None):
        """One pre-norm block; with select_BQ, the output is [B, Q, D] at those columns."""
        attn_out, kv_cache = self.attn(self.ln_1(h_BTD), positions_BT, mask_BTS, keys, kv_cache,
                                       select_BQ)
        if select_BQ is not None:
            h_BTD = layers.take_columns(h_BTD, select_BQ)
        h_BTD = h_BTD + attn_out
        return h_BTD + self.mlp(self.ln_2(h_BTD)), kv_cache


class GPT2(nnx.Module):
    """Decoder LM: `logits_BTV, cache = model(tokens_BT, positions_BT, attention_mask_BT, cache)`."""

    # none (`frozen_forward_params`): the token and position embeddings are added in fp32, and
    # the tied embedding is both
    CAST_AT_USE = ()

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.arch != "gpt2":
            raise ValueError(f"GPT2 needs cfg.arch='gpt2', got {cfg.arch!r}")
        if cfg.num_kv_heads != cfg.num_heads or cfg.d_model != cfg.num_heads * cfg.head_dim:
            raise ValueError("GPT-2 has no GQA and d_model == num_heads * head_dim; got "
                             f"{cfg.num_heads=} {cfg.num_kv_heads=} {cfg.d_model=} {cfg.head_dim=}")
        self.cfg = cfg
        V, P, D, pd = cfg.vocab_size, cfg.max_positions, cfg.d_model, cfg.params_dtype
        self.embed_VD = param(_normal, rngs.params(), (V, D), pd, ("vocab", "embed"))
        self.pos_embed_PD = param(_normal, rngs.params(), (P, D), pd, ("positions", "embed"))
        self.layers = layers.make_stacked_layers(lambda r: Block(cfg, r), cfg.num_layers, rngs)
        self.ln_f = LayerNorm(cfg, rngs)
        if cfg.labels:  # a sequence classifier: `score` on the last token (the LM head is tied)
            self.score_DC = param(_normal, rngs.params(), (D, len(cfg.labels)), pd, ("embed", "labels"))

    def unembedding_VD(self) -> jax.Array:
        return self.embed_VD[...]

    def hidden_states(self, tokens_BT, positions_BT, attention_mask_BT, cache: KVCache | None = None,
                      segments_BT=None, select_BQ=None):
        """Final-norm hidden states [B, T, D] in the compute dtype, and the updated cache.
        segments_BT: int segment ids, no cache (see `attention.key_info`). select_BQ: int [B, Q],
        return [B, Q, D] at those columns only, computed with less work (`layers.run_layers`)."""
        cfg = self.cfg
        h = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        # Padding rows may carry any position; clip so the gather stays in range.
        positions = jnp.clip(positions_BT, 0, cfg.max_positions - 1)
        h = (h + jnp.take(self.pos_embed_PD[...], positions, axis=0)).astype(cfg.compute_dtype)
        return layers.final_hidden(cfg, self.layers, h, positions_BT, attention_mask_BT, cache,
                                   self.ln_f, select_BQ=select_BQ, segments_BT=segments_BT)

    def classify(self, tokens_BT, positions_BT, attention_mask_BT, token_types_BT=None):
        """Sequence classifier (cfg.labels): fp32 logits [B, C] at each row's last real token
        (HF `…ForSequenceClassification`). token_types_BT: ignored (decoders have none)."""
        return heads.decoder_classify(self, tokens_BT, positions_BT, attention_mask_BT)

    def __call__(self, tokens_BT, positions_BT, attention_mask_BT, cache: KVCache | None = None):
        h, cache = self.hidden_states(tokens_BT, positions_BT, attention_mask_BT, cache)
        return ops.logits_from_hidden(h, self.unembedding_VD()), cache
