"""Flax NNX decoder LMs (GPT-2 and the Llama family) and their Hugging Face import/export.

Every family has one call contract::

    logits_BTV, cache = model(tokens_BT, positions_BT, attention_mask_BT, cache=None)

Positions come from the caller (left padding works); `cache` is a `KVCache` or None.
"""
from flax import nnx

from pdpo_jax.models.common import SHAPE_LEGEND, KVCache, ModelConfig
from pdpo_jax.models.gpt2 import GPT2
from pdpo_jax.models.llama import Llama

_FAMILIES = {"gpt2": GPT2, "llama": Llama}


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
    """A freshly initialised model of `cfg.arch` (random weights)."""
    if cfg.arch not in _FAMILIES:
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {sorted(_FAMILIES)}")
    return _FAMILIES[cfg.arch](cfg, rngs=rngs or nnx.Rngs(seed))


from pdpo_jax.models.hf_io import from_pretrained, save_pretrained, config_from_hf  # noqa: E402

__all__ = ["GPT2", "Llama", "KVCache", "ModelConfig", "SHAPE_LEGEND", "build_model",
           "from_pretrained", "save_pretrained", "config_from_hf"]
