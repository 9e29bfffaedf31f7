"""Flax NNX decoder LMs (GPT-2 and the Llama family), BERT/RoBERTa encoders, and their Hugging
Face import/export.

Every decoder family has one call contract::

    logits_BTV, cache = model(tokens_BT, positions_BT, attention_mask_BT, cache=None)

Positions come from the caller (left padding works); `cache` is a `KVCache` or None.
Sequence classifiers (`ModelConfig.labels`; HF `…ForSequenceClassification` of any family)::

    logits_BC = model.classify(tokens_BT, positions_BT, attention_mask_BT, token_types_BT=None)
"""
from pdpo_jax.models.attention import KVCache
from pdpo_jax.models.bert import Bert
from pdpo_jax.models.config import SHAPE_LEGEND, ModelConfig
from pdpo_jax.models.families import build_model
from pdpo_jax.models.gpt2 import GPT2
from pdpo_jax.models.hf_io import config_from_hf, from_pretrained, save_pretrained
from pdpo_jax.models.llama import Llama

__all__ = ["Bert", "GPT2", "Llama", "KVCache", "ModelConfig", "SHAPE_LEGEND", "build_model",
           "from_pretrained", "save_pretrained", "config_from_hf"]
