"""Sequence-classification heads: which column of a row is pooled, and the fp32 label logits.

HF's decoder classifiers (`LlamaForSequenceClassification`, `GPT2ForSequenceClassification`)
apply a bias-free `score` [D, C] to the final hidden state of each row's rightmost non-pad
token; BERT and RoBERTa pool the first token ([CLS], <s>) through dense → tanh → a [D, C] linear
(`Bert.classify`). Rows are found from the attention mask, so an EOS that equals the pad id
still counts (HF compares token ids with pad_token_id instead; the same where pad ids only pad).
"""
from __future__ import annotations

import jax.numpy as jnp


def last_real_column(attention_mask_BT) -> jnp.ndarray:
    """int32 [B, 1]: each row's rightmost real column (left or right padding; 0 for empty rows)."""
    T = attention_mask_BT.shape[1]
    index = jnp.where(attention_mask_BT, jnp.arange(T, dtype=jnp.int32)[None, :], -1)
    return jnp.maximum(jnp.max(index, axis=1, keepdims=True), 0)


def first_real_column(attention_mask_BT) -> jnp.ndarray:
    """int32 [B, 1]: each row's first real column ([CLS] / <s>; 0 for empty rows)."""
    return jnp.argmax(attention_mask_BT, axis=1, keepdims=True).astype(jnp.int32)


def label_logits(h_BD, w_DC, bias_C=None) -> jnp.ndarray:
    """fp32 logits [B, C] = h·W (+ b), accumulated in fp32 whatever the compute dtype."""
    logits = jnp.einsum("BD,DC->BC", h_BD, w_DC.astype(h_BD.dtype),
                        preferred_element_type=jnp.float32)
    return logits if bias_C is None else logits + bias_C.astype(jnp.float32)[None]


def decoder_classify(model, tokens_BT, positions_BT, attention_mask_BT):
    """A decoder classifier's fp32 logits [B, C]: `model.score_DC` on the final hidden state
    of each row's last real token (only that column runs the last layer's queries and MLP)."""
    h_B1D, _ = model.hidden_states(tokens_BT, positions_BT, attention_mask_BT,
                                   select_BQ=last_real_column(attention_mask_BT))
    return label_logits(h_B1D[:, 0], model.score_DC[...])
