"""The model families by name: `build_model(cfg)` makes a randomly initialised model of `cfg.arch`."""
from __future__ import annotations

from flax import nnx

from pdpo_jax.models.bert import Bert
from pdpo_jax.models.config import ModelConfig
from pdpo_jax.models.gpt2 import GPT2
from pdpo_jax.models.llama import Llama

FAMILIES = {"gpt2": GPT2, "llama": Llama, "bert": Bert}


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
    """A freshly initialised model of `cfg.arch` (random weights)."""
    if cfg.arch not in FAMILIES:
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.arch](cfg, rngs=rngs or nnx.Rngs(seed))
