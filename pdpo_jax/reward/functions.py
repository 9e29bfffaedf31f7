"""Reward of a reply from its NLI probabilities against each persona sentence.

Every function maps p_entail_RS, p_contradict_RS (float [R, S]: reply r against persona
sentence s, premise = the persona sentence, hypothesis = the reply) and mask_RS (bool [R, S],
False where reply r has fewer than S sentences) to rewards [R]; a reply with no sentence gets 0.

`song2020` (the default) is the consistency reward of Song et al. (2020), "Generating Persona
Consistent Dialogues by Exploiting Natural Language Inference", AAAI 34, pp. 8878–8885
(arXiv:1911.05889), which the paper reproduced here builds its +RL(DialogueNLI) baseline after.
Only the paper's abstract and introduction could be read here; what the reward computes is taken
from the authors' released code (github.com/songhaoyu/RCDG: reinforcement_train/onmt/modules/
Distriminitor.py, `NLI.forward`; onmt/Loss.py, the `self_sample` branch): the NLI module scores
the response against each persona sentence, keeps the sentence with the highest contradiction
score, and rewards the response with that sentence's entailment score:

    i* = argmax_s p_contradict[r, s]        reward[r] = p_entail[r, i*]

so a reply is rewarded for entailing the persona only as far as it contradicts none of it.
Where we chose: (1) scores are the softmax probabilities of our 3-way classifier (RCDG trained
its NLI with per-class sigmoids on one-hot targets and took σ(logit)); (2) every persona sentence
counts (RCDG's code reads the first four); (3) RCDG adds a naturalness discriminator's σ(D) and
subtracts a 0.8 baseline, r = σ(D) + σ(z_entail) − 0.8: neither is part of the NLI reward here
(PPO brings its own value baseline; a constant shift changes no advantage).

Alternatives for ablations: `entail_minus_contradict` = Σ_s (p_entail − p_contradict) and
`max_entail_minus_max_contradict` = max_s p_entail − max_s p_contradict.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from pdpo_jax.config.schema import REWARD_FUNCTIONS as NAMES

RewardFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def song2020(p_entail_RS, p_contradict_RS, mask_RS):
    """p_entail of the persona sentence the reply contradicts most (module doc)."""
    worst = jnp.argmax(jnp.where(mask_RS, p_contradict_RS, -jnp.inf), axis=1)
    reward = jnp.take_along_axis(p_entail_RS, worst[:, None], axis=1)[:, 0]
    return jnp.where(mask_RS.any(axis=1), reward, 0.0)


def entail_minus_contradict(p_entail_RS, p_contradict_RS, mask_RS):
    """Σ over the persona sentences of (p_entail − p_contradict)."""
    return jnp.sum(jnp.where(mask_RS, p_entail_RS - p_contradict_RS, 0.0), axis=1)


def max_entail_minus_max_contradict(p_entail_RS, p_contradict_RS, mask_RS):
    """The best entailment minus the worst contradiction over the persona sentences."""
    best = jnp.max(jnp.where(mask_RS, p_entail_RS, -jnp.inf), axis=1)
    worst = jnp.max(jnp.where(mask_RS, p_contradict_RS, -jnp.inf), axis=1)
    return jnp.where(mask_RS.any(axis=1), best - worst, 0.0)


FUNCTIONS: dict[str, RewardFn] = {"song2020": song2020,
                                  "entail_minus_contradict": entail_minus_contradict,
                                  "max_entail_minus_max_contradict": max_entail_minus_max_contradict}
if tuple(FUNCTIONS) != NAMES:  # the config schema's Literal lists the same names
    raise RuntimeError(f"reward functions {tuple(FUNCTIONS)} differ from the schema's {NAMES}")


def reward_function(name: str) -> RewardFn:
    if name not in FUNCTIONS:
        raise ValueError(f"unknown reward function {name!r}; choose one of {sorted(FUNCTIONS)}")
    return FUNCTIONS[name]
