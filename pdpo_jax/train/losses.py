"""Small pure loss functions; preference objectives are picked from a registry by name.

Preference losses take per-pair policy/reference log-prob sums (fp32 [B]) and return the
per-pair loss [B]; the step averages it over the real pairs (`PairLogps.real`). Rewards are
β·(log π − log π_ref), as trl reports them. The menu is trl 1.16's `DPOConfig.loss_type` with
trl's definitions (`trl/trainer/dpo_trainer.py: DPOTrainer._compute_loss`), plus cDPO, SimPO
(trl's CPOTrainer `loss_type="simpo"`) and ORPO; docs/guide.md "The loss menu" lists them.

Three losses look at the whole batch, not one pair: `sft` (a token mean over the batch's chosen
replies), `aot` and `aot_unpaired` (sorted across the batch). As in trl, whose loss sees one
per-device micro-batch, "the batch" is one micro-batch of the step (all its devices together);
each real pair carries an equal share, so the step's mean over pairs gives the batch value.
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
        return self.chosen_logratio - self.rejected_logratio

    @property
    def chosen_logratio(self):
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratio(self):
        return self.policy_rejected - self.ref_rejected

    @property
    def real(self):
        """[B] bool: the pair has both replies (padding rows have neither)."""
        return (self.chosen_len > 0) & (self.rejected_len > 0)

    def per_token(self, chosen, rejected):
        """`chosen`, `rejected` [B] divided by their reply lengths (at least 1, as trl clamps)."""
        return (chosen / jnp.maximum(self.chosen_len, 1),
                rejected / jnp.maximum(self.rejected_len, 1))


def _smoothed_sigmoid(z, label_smoothing):
    """−(1−ε) log σ(z) − ε log σ(−z): the sigmoid loss with labels flipped with probability ε."""
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def sigmoid_dpo(lp: PairLogps, beta: float) -> jax.Array:
    """Rafailov et al. (2023): −log σ(β Δ)."""
    return -jax.nn.log_sigmoid(beta * lp.logratio_delta())


def conservative_dpo(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """cDPO: labels flipped with probability ε: −(1−ε) log σ(βΔ) − ε log σ(−βΔ)."""
    return _smoothed_sigmoid(beta * lp.logratio_delta(), label_smoothing)


def hinge(lp: PairLogps, beta: float) -> jax.Array:
    """SLiC (Zhao et al. 2023): max(0, 1 − βΔ)."""
    return jax.nn.relu(1 - beta * lp.logratio_delta())


def ipo(lp: PairLogps, beta: float) -> jax.Array:
    """IPO (Azar et al. 2023): (Δ̄ − 1/(2β))², with Δ̄ on length-normalised log-probs as in trl."""
    c, r = lp.per_token(lp.chosen_logratio, lp.rejected_logratio)
    return jnp.square(c - r - 1.0 / (2.0 * beta))


def sigmoid_norm(lp: PairLogps, beta: float) -> jax.Array:
    """trl's `sigmoid_norm`: −log σ(β Δ̄), Δ̄ the margin of per-token (length-normalised)
    log-ratios."""
    c, r = lp.per_token(lp.chosen_logratio, lp.rejected_logratio)
    return -jax.nn.log_sigmoid(beta * (c - r))


def exo_pair(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q ‖ p) over {chosen, rejected}, q = (σ(βΔ), σ(−βΔ)),
    p = (1−ε, ε); needs ε > 0."""
    z = beta * lp.logratio_delta()
    log_qw, log_ql = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    return (jnp.exp(log_qw) * (log_qw - jnp.log1p(-label_smoothing))
            + jnp.exp(log_ql) * (log_ql - jnp.log(label_smoothing)))


def nca_pair(lp: PairLogps, beta: float) -> jax.Array:
    """NCA (Chen et al. 2024): −log σ(β r_c) − ½ log σ(−β r_c) − ½ log σ(−β r_r), r the
    log-ratios."""
    zc, zr = beta * lp.chosen_logratio, beta * lp.rejected_logratio
    return -jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc) - 0.5 * jax.nn.log_sigmoid(-zr)


def robust(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """Robust DPO (Chowdhury et al. 2024): (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)."""
    z = beta * lp.logratio_delta()
    return (-(1 - label_smoothing) * jax.nn.log_sigmoid(z)
            + label_smoothing * jax.nn.log_sigmoid(-z)) / (1 - 2 * label_smoothing)


def bco_pair(lp: PairLogps, beta: float) -> jax.Array:
    """Paired BCO (Jung et al. 2024) as trl 1.16 defines it: −log σ(β r_c) − log σ(−β r_r).
    Stateless: trl 1.16 dropped the running reward mean δ that older trl subtracted."""
    return (-jax.nn.log_sigmoid(beta * lp.chosen_logratio)
            - jax.nn.log_sigmoid(-beta * lp.rejected_logratio))


def sppo_hard(lp: PairLogps, beta: float) -> jax.Array:
    """SPPO (Wu et al. 2024) with hard win probabilities: (r_c − 1/(2β))² + (r_r + 1/(2β))²."""
    return (jnp.square(lp.chosen_logratio - 0.5 / beta)
            + jnp.square(lp.rejected_logratio + 0.5 / beta))


def _sorted_real(x, real):
    """The real entries of x [B] in ascending order, then 0 for each padding row."""
    ranked = jnp.sort(jnp.where(real, x, jnp.inf))
    return jnp.where(jnp.arange(x.shape[0]) < jnp.sum(real), ranked, 0.0)


def _by_rank(per_rank, real):
    """Per-rank losses [B] (ranks 0..n−1 real) handed out to the n real rows in order: the
    k-th real pair carries rank k's loss, so the masked sum over pairs is the sum over ranks."""
    return jnp.where(real, per_rank[jnp.maximum(jnp.cumsum(real) - 1, 0)], 0.0)


def aot(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """AOT (Melnyk et al. 2024), paired: the batch's sorted policy margins log π_c − log π_r minus
    the sorted reference margins, δ, through the smoothed sigmoid loss of βδ."""
    real = lp.real
    delta = (_sorted_real(lp.policy_chosen - lp.policy_rejected, real)
             - _sorted_real(lp.ref_chosen - lp.ref_rejected, real))
    return _by_rank(_smoothed_sigmoid(beta * delta, label_smoothing), real)


def aot_unpaired(lp: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """AOT, unpaired: sorted chosen log-ratios minus sorted rejected log-ratios, δ, through the
    smoothed sigmoid loss of βδ."""
    real = lp.real
    delta = _sorted_real(lp.chosen_logratio, real) - _sorted_real(lp.rejected_logratio, real)
    return _by_rank(_smoothed_sigmoid(beta * delta, label_smoothing), real)


def apo_zero(lp: PairLogps, beta: float) -> jax.Array:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 − σ(β r_c) + σ(β r_r)."""
    return ((1 - jax.nn.sigmoid(beta * lp.chosen_logratio))
            + jax.nn.sigmoid(beta * lp.rejected_logratio))


def apo_down(lp: PairLogps, beta: float) -> jax.Array:
    """APO-down (Eq. 8): σ(β r_c) + 1 − σ(β (r_c − r_r))."""
    return (jax.nn.sigmoid(beta * lp.chosen_logratio)
            + (1 - jax.nn.sigmoid(beta * lp.logratio_delta())))


def discopop(lp: PairLogps, beta: float, discopop_tau: float) -> jax.Array:
    """DiscoPOP (Chris Lu et al. 2024, Eq. 5), ρ = βΔ, m = σ(ρ/τ): (1 − m)·(−log σ(ρ)) + m·e^(−ρ).
    m·e^(−ρ) is computed as exp(log σ(ρ/τ) − ρ): the same number, without trl's inf·0 = NaN
    for a very negative ρ."""
    rho = beta * lp.logratio_delta()
    m = jax.nn.sigmoid(rho / discopop_tau)
    return (-(1 - m) * jax.nn.log_sigmoid(rho)
            + jnp.exp(jax.nn.log_sigmoid(rho / discopop_tau) - rho))


def sft(lp: PairLogps) -> jax.Array:
    """trl's `sft`: the chosen replies' NLL per token over the batch, −Σ log π_c / Σ |y_c|, the
    same number for every real pair."""
    real = lp.real
    tokens = jnp.sum(jnp.where(real, lp.chosen_len, 0))
    nll = -jnp.sum(jnp.where(real, lp.policy_chosen, 0.0)) / jnp.maximum(tokens, 1)
    return jnp.where(real, nll, 0.0)


def simpo(lp: PairLogps, beta: float, simpo_gamma: float, label_smoothing: float) -> jax.Array:
    """SimPO (Meng et al. 2024), reference-free: z = β (log π_c/|y_c| − log π_r/|y_r|) − γ through
    the smoothed sigmoid loss, as trl's CPOTrainer (`loss_type="simpo"`) computes it."""
    c, r = lp.per_token(lp.policy_chosen, lp.policy_rejected)
    return _smoothed_sigmoid(beta * (c - r) - simpo_gamma, label_smoothing)


# Largest mean log-prob ORPO's odds see: log(1 − p) is −inf at p = 1 (a reply of probability
# 1 in fp32, or a padding row's 0/1); the odds of p = 1 − 1.2e-7 are finite and enormous.
_MAX_MEAN_LOGP = -float(jnp.finfo(jnp.float32).eps)


def _log1mexp(x):
    """log(1 − eˣ) for x < 0, switching at −ln 2 to avoid cancellation (as trl's ORPO does)."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def odds_ratio(lp: PairLogps) -> jax.Array:
    """ORPO's odds-ratio term −log σ(log odds(y_c) − log odds(y_r)), odds(y) = p/(1 − p) of the
    per-token mean probability p = exp(log π(y)/|y|) (trl's ORPOTrainer.odds_ratio_loss,
    negated and divided by its β = λ)."""
    c, r = lp.per_token(lp.policy_chosen, lp.policy_rejected)
    c, r = jnp.minimum(c, _MAX_MEAN_LOGP), jnp.minimum(r, _MAX_MEAN_LOGP)
    return -jax.nn.log_sigmoid((c - r) - (_log1mexp(c) - _log1mexp(r)))


def orpo(lp: PairLogps, orpo_lambda: float) -> jax.Array:
    """ORPO (Hong et al. 2024), reference-free: the chosen replies' NLL (`sft`) + λ · odds ratio.
    trl's ORPOTrainer also counts the prompt's tokens in the NLL; here it is the reply's, as in
    SFT."""
    return sft(lp) + orpo_lambda * odds_ratio(lp)


PREFERENCE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": sigmoid_dpo, "cdpo": conservative_dpo, "hinge": hinge, "ipo": ipo,
    "exo_pair": exo_pair, "nca_pair": nca_pair, "robust": robust, "bco_pair": bco_pair,
    "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sigmoid_norm": sigmoid_norm, "sft": sft,
    "simpo": simpo, "orpo": orpo,
}

# Losses that read no reference log-probs: an objective made only of these (and RPO's NLL)
# skips the reference forward.
REFERENCE_FREE = frozenset({"sft", "simpo", "orpo"})

# Every hyperparameter a loss may take, and its default: a loss that does not read it may be
# given it at that value only. None: any value may go unread (beta, shared by all).
NEUTRAL = {"beta": None, "label_smoothing": 0.0, "simpo_gamma": 0.5, "discopop_tau": 0.05,
           "orpo_lambda": 0.1}

# Hyperparameters that must be positive for a loss (at their neutral value it is undefined).
NEEDS_POSITIVE = {"exo_pair": "label_smoothing"}


def reads(name: str) -> list[str]:
    """The hyperparameters loss `name` takes (its signature's names after `lp`)."""
    return [k for k in inspect.signature(PREFERENCE_LOSSES[name]).parameters if k != "lp"]


def check_hyperparameters(names, hyper: dict[str, float]) -> None:
    """ValueError naming the key if a hyperparameter is unknown, set away from its neutral value
    while none of the losses `names` reads it, or zero where one of them needs it positive."""
    for name in names:
        if name not in PREFERENCE_LOSSES:
            raise ValueError(f"dpo.loss: unknown loss {name!r}; "
                             f"choose from {sorted(PREFERENCE_LOSSES)}")
        key = NEEDS_POSITIVE.get(name)
        if key is not None and not hyper.get(key, NEUTRAL[key]) > 0:
            raise ValueError(f"dpo.loss={name!r} needs dpo.{key} > 0")
    read = {k for name in names for k in reads(name)}
    for key, value in hyper.items():
        if key not in NEUTRAL:
            raise TypeError(f"unknown preference-loss hyperparameter {key!r}; "
                            f"known: {sorted(NEUTRAL)}")
        if key not in read and NEUTRAL[key] is not None and value != NEUTRAL[key]:
            raise ValueError(f"dpo.{key}={value} has no effect on dpo.loss={list(names)}; "
                             f"the selected losses read {sorted(read)}")


def preference_loss(name: str, lp: PairLogps, **hyper: float) -> jax.Array:
    """Loss `name` of PREFERENCE_LOSSES on `lp`, given the hyperparameters it takes by name
    (its signature lists them); a hyperparameter set away from its neutral default for a loss
    that does not read it is an error, not silently ignored."""
    return weighted_preference_loss((name,), (1.0,), lp, **hyper)


def weighted_preference_loss(names, weights, lp: PairLogps, **hyper: float) -> jax.Array:
    """Σᵢ wᵢ · lossᵢ(lp) per pair [B] (trl's `loss_type=[…]` with `loss_weights=[…]`); each loss
    gets the hyperparameters it reads, and every one given must be read by some loss."""
    check_hyperparameters(names, hyper)
    total = jnp.zeros_like(lp.policy_chosen)
    for name, weight in zip(names, weights, strict=True):
        fn = PREFERENCE_LOSSES[name]
        total = total + weight * fn(lp, **{k: v for k, v in hyper.items() if k in reads(name)})
    return total


def rpo_nll(lp: PairLogps) -> jax.Array:
    """RPO's extra term: the chosen reply's per-token NLL under the policy, per pair [B]."""
    return -lp.policy_chosen / jnp.maximum(lp.chosen_len, 1)


def preference_metrics(lp: PairLogps, beta: float) -> dict[str, jax.Array]:
    """Per-pair trl metrics [B]; the caller averages them over the global batch. Without a
    reference (ref log-probs 0) rewards are β·log π, as trl's CPO/ORPO trainers log them."""
    chosen = beta * lp.chosen_logratio
    rejected = beta * lp.rejected_logratio
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
