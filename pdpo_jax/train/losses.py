"""Small pure loss functions; preference objectives are picked from a registry by name.

Preference losses take per-pair policy/reference log-prob sums (fp32 [B]) and return the
per-pair loss [B]. Rewards are β·(log π − log π_ref), as trl reports them.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PairLogps:
    """Summed response log-probs [B] of the chosen/rejected replies, and their lengths [B]."""
    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array

    def logratio_delta(self):
        """(log π_c − log π_ref,c) − (log π_r − log π_ref,r): the implicit reward margin / β."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


def sigmoid_dpo(lp: PairLogps, beta: float) -> jax.Array:
    """Rafailov et al. (2023): −log σ(β Δ)."""
    return -jax.nn.log_sigmoid(beta * lp.logratio_delta())


def conservative_dpo(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """cDPO: labels flipped with probability ε: −(1−ε) log σ(βΔ) − ε log σ(−βΔ)."""
    z = beta * lp.logratio_delta()
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def ipo(lp: PairLogps, beta: float) -> jax.Array:
    """IPO (Azar et al. 2023): (Δ̄ − 1/(2β))², with Δ̄ on length-normalised log-probs as in trl."""
    c, r = jnp.maximum(lp.chosen_len, 1), jnp.maximum(lp.rejected_len, 1)
    delta = (lp.policy_chosen - lp.ref_chosen) / c - (lp.policy_rejected - lp.ref_rejected) / r
    return jnp.square(delta - 1.0 / (2.0 * beta))


PREFERENCE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": sigmoid_dpo,
    "cdpo": conservative_dpo,
    "ipo": ipo,
}


def preference_loss(name: str, lp: PairLogps, **hyper: float) -> jax.Array:
    """Loss `name` of PREFERENCE_LOSSES on `lp`, given the hyperparameters it takes by name
    (its signature lists them); a hyperparameter set away from its neutral default for a loss
    that does not read it is an error, not silently ignored."""
    fn = PREFERENCE_LOSSES[name]
    takes = inspect.signature(fn).parameters
    for key, value in hyper.items():
        if key not in NEUTRAL:
            raise TypeError(f"unknown preference-loss hyperparameter {key!r}; known: {sorted(NEUTRAL)}")
        if key not in takes and NEUTRAL[key] is not None and value != NEUTRAL[key]:
            raise ValueError(f"dpo.{key}={value} has no effect on dpo.loss={name!r}; "
                             f"{name!r} reads {[k for k in takes if k != 'lp']}")
    return fn(lp, **{k: v for k, v in hyper.items() if k in takes})


# Every hyperparameter a loss may take, and the value at which it changes nothing (a loss that
# does not read it may then be given it); None: any value may go unread (beta, shared by all).
NEUTRAL = {"beta": None, "label_smoothing": 0.0}


def rpo_nll(lp: PairLogps) -> jax.Array:
    """RPO's extra term: the chosen reply's per-token NLL under the policy, per pair [B]."""
    return -lp.policy_chosen / jnp.maximum(lp.chosen_len, 1)


def preference_metrics(lp: PairLogps, beta: float) -> dict[str, jax.Array]:
    """Per-pair trl metrics [B]; the caller averages them over the global batch."""
    chosen = beta * (lp.policy_chosen - lp.ref_chosen)
    rejected = beta * (lp.policy_rejected - lp.ref_rejected)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
        "rewards/margins": chosen - rejected,
        "logps/chosen": lp.policy_chosen,
        "logps/rejected": lp.policy_rejected,
    }


def token_nll_sum(logp_BR, valid_BR):
    """Summed NLL over response tokens and the token count (normalised by the caller, so
    gradient accumulation divides by the tokens of all micro-batches)."""
    return -jnp.sum(jnp.where(valid_BR, logp_BR, 0.0)), jnp.sum(valid_BR)


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
