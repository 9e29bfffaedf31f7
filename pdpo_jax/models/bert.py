"""BERT and RoBERTa encoders with their sequence-classification head, as one Flax NNX module.

Reads like HF's `modeling_bert.py`: word + learned position + token-type embeddings, then
LayerNorm; post-LN blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))) with biased q/k/v/o
projections and a GELU MLP; bidirectional attention over the real tokens. Switches:
`position_offset` (RoBERTa numbers real tokens from pad_token_id + 1, so position p reads row
p + offset of the table), `type_vocab_size` (BERT 2, RoBERTa 1), `hidden_act` ('gelu' is the
exact erf GELU, 'gelu_new' / 'gelu_pytorch_tanh' the tanh approximation), LayerNorm eps.

The head (cfg.labels) is the same function for both: the first token's final hidden state
through dense [D, D] → tanh → linear [D, C]. HF calls it `bert.pooler` + `classifier` in BERT
and `classifier.dense` + `classifier.out_proj` in RoBERTa (`hf_io` maps the names).
Dropout is not modelled (inference and our NLI training run without it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdpo_jax.models import attention, heads, layers, ops
from pdpo_jax.models.config import ModelConfig, param
from pdpo_jax.models.gpt2 import LayerNorm

_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros

ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # -> tanh approximation


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, H, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.params_dtype
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_DNH", param(_normal, rngs.params(), (D, N, H), pd,
                                               ("embed", "heads", "head_dim")))
            setattr(self, f"{name}_bias_NH", param(_zeros, rngs.params(), (N, H), pd,
                                                   ("heads", "head_dim")))
        self.o_NHD = param(_normal, rngs.params(), (N, H, D), pd, ("heads", "head_dim", "embed"))
        self.o_bias_D = param(_zeros, rngs.params(), (D,), pd, ("bias",))

    def _project(self, name: str, x_BTD):
        dt = x_BTD.dtype
        w, b = getattr(self, f"{name}_DNH")[...], getattr(self, f"{name}_bias_NH")[...]
        return ops.dense("BTD,DNH->BTNH", x_BTD, w.astype(dt)) + b.astype(dt)[None, None]

    def __call__(self, x_BTD, positions_BT, mask_BTS, keys, kv_cache, select_BQ=None):
        """Keys and values of every column; queries (and the output) at select_BQ's columns
        only when it is given (`layers.run_layers`)."""
        x_BQD, _, mask_BQS = layers.select_queries(select_BQ, x_BTD, None, mask_BTS)
        q, k, v = self._project("q", x_BQD), self._project("k", x_BTD), self._project("v", x_BTD)
        out_BQNH, _ = attention.attend(self.cfg, q, k, v, mask_BQS, keys, None)
        dt = x_BTD.dtype
        out = ops.dense("BTNH,NHD->BTD", out_BQNH, self.o_NHD[...].astype(dt))
        return out + self.o_bias_D[...].astype(dt)[None, None], kv_cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pd = cfg.d_model, cfg.mlp_dim, cfg.params_dtype
        self.tanh_gelu = ACTIVATIONS[cfg.hidden_act]
        self.fc_DF = param(_normal, rngs.params(), (D, F), pd, ("embed", "mlp"))
        self.fc_bias_F = param(_zeros, rngs.params(), (F,), pd, ("mlp",))
        self.proj_FD = param(_normal, rngs.params(), (F, D), pd, ("mlp", "embed"))
        self.proj_bias_D = param(_zeros, rngs.params(), (D,), pd, ("bias",))

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        h = ops.dense("BTD,DF->BTF", x_BTD, self.fc_DF[...].astype(dt))
        h = jax.nn.gelu(h + self.fc_bias_F[...].astype(dt)[None, None], approximate=self.tanh_gelu)
        h = ops.dense("BTF,FD->BTD", h, self.proj_FD[...].astype(dt))
        return h + self.proj_bias_D[...].astype(dt)[None, None]


class Block(nnx.Module):
    """Post-LN: LN(x + attn(x)), then LN(x + mlp(x)) (HF BertLayer)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs)
        self.attn_norm = LayerNorm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)
        self.mlp_norm = LayerNorm(cfg, rngs)

    def __call__(self, h_BTD, positions_BT, mask_BTS, keys, kv_cache, select_BQ=None):
        attn_out, _ = self.attn(h_BTD, positions_BT, mask_BTS, keys, None, select_BQ)
        if select_BQ is not None:
            h_BTD = layers.take_columns(h_BTD, select_BQ)
        h_BTD = self.attn_norm(h_BTD + attn_out)
        return self.mlp_norm(h_BTD + self.mlp(h_BTD)), kv_cache


class Bert(nnx.Module):
    """Encoder: `hidden_states(...)` [B, T, D]; with cfg.labels, `classify(...)` [B, C]."""

    CAST_AT_USE = ()  # embeddings are summed and normalised in fp32 (`frozen_forward_params`)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.arch != "bert":
            raise ValueError(f"Bert needs cfg.arch='bert', got {cfg.arch!r}")
        if cfg.num_kv_heads != cfg.num_heads or cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BERT has no GQA and a GELU MLP ({sorted(ACTIVATIONS)}); got "
                             f"{cfg.num_kv_heads=} {cfg.num_heads=} {cfg.hidden_act=}")
        self.cfg = cfg
        V, P, D, pd = cfg.vocab_size, cfg.max_positions, cfg.d_model, cfg.params_dtype
        self.embed_VD = param(_normal, rngs.params(), (V, D), pd, ("vocab", "embed"))
        self.pos_embed_PD = param(_normal, rngs.params(), (P, D), pd, ("positions", "embed"))
        if cfg.type_vocab_size:
            self.type_embed_YD = param(_normal, rngs.params(), (cfg.type_vocab_size, D), pd,
                                       ("types", "embed"))
        self.embed_norm = LayerNorm(cfg, rngs)
        self.layers = layers.make_stacked_layers(lambda r: Block(cfg, r), cfg.num_layers, rngs)
        if cfg.labels:
            C = len(cfg.labels)
            self.pooler_DD = param(_normal, rngs.params(), (D, D), pd, ("embed", "embed"))
            self.pooler_bias_D = param(_zeros, rngs.params(), (D,), pd, ("bias",))
            self.classifier_DC = param(_normal, rngs.params(), (D, C), pd, ("embed", "labels"))
            self.classifier_bias_C = param(_zeros, rngs.params(), (C,), pd, ("labels",))

    def hidden_states(self, tokens_BT, positions_BT, attention_mask_BT, token_types_BT=None,
                      select_BQ=None):
        """Final hidden states [B, T, D] (or [B, Q, D] at select_BQ's columns) in the compute
        dtype. positions_BT: 0-based position of each real token (right padding: 0..n-1);
        token_types_BT: segment ids (None: all 0)."""
        cfg = self.cfg
        h = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        positions = jnp.clip(positions_BT + cfg.position_offset, 0, cfg.max_positions - 1)
        h = h + jnp.take(self.pos_embed_PD[...], positions, axis=0)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
            h = h + jnp.take(self.type_embed_YD[...], types, axis=0)
        h = self.embed_norm(h.astype(jnp.float32)).astype(cfg.compute_dtype)
        h, _ = layers.final_hidden(cfg, self.layers, h, positions_BT, attention_mask_BT, None,
                                   lambda x: x, select_BQ=select_BQ)
        return h

    def classify(self, tokens_BT, positions_BT, attention_mask_BT, token_types_BT=None):
        """fp32 logits [B, C]: the first real token ([CLS] / <s>) through dense → tanh →
        linear. Only that column runs the last layer's queries and MLP."""
        if not self.cfg.labels:
            raise ValueError("this encoder has no classification head (ModelConfig.labels is empty)")
        h = self.hidden_states(tokens_BT, positions_BT, attention_mask_BT, token_types_BT,
                               select_BQ=heads.first_real_column(attention_mask_BT))[:, 0]
        pooled = ops.dense("BD,DE->BE", h, self.pooler_DD[...].astype(h.dtype))
        pooled = jnp.tanh(pooled + self.pooler_bias_D[...].astype(h.dtype)[None])
        return heads.label_logits(pooled, self.classifier_DC[...], self.classifier_bias_C[...])
