"""PPO for a language model, as trl's PPO does it: a policy with a value head on its trunk, a
frozen reference, a per-token KL penalty plus the terminal reward, GAE, clipped policy and value
losses, whitened advantages, several minibatch epochs per rollout batch.

Rollout rows use the SFT layout ([prompt | response | pad], right-padded; `loss_mask` marks the
response): position t of the response window is the state before the response's token t.
`make_ppo_score` computes, in one compiled call, what a rollout batch is held against — the
policy's log-probs and values when it sampled, and the reference's log-probs; `advantages`
turns them and the scores into per-token advantages and returns; `make_ppo_step` then runs one
minibatch update. Metric names are trl's (objective/kl, policy/approxkl, val/vf_loss, …).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pdpo_jax.train.logprobs import LOGIT_CHUNK, response_window, token_logps
from pdpo_jax.train.steps import FIELDS, TrainState, apply_update


@dataclasses.dataclass(frozen=True)
class PpoHyper:
    """trl's PPO defaults: γ 1, λ 0.95, clip 0.2 (policy and value), value-loss weight 0.1."""
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True


def init_value_head(d_model: int, dtype=jnp.float32) -> dict:
    """The value head: a [D] projection and a bias, zero so it starts by predicting 0."""
    return {"w_D": jnp.zeros((d_model,), dtype), "bias": jnp.zeros((), dtype)}


def logps_and_values(graphdef, params, batch, *, window: int, chunk: int = LOGIT_CHUNK):
    """(log-probs, values, mask), each [B, window], of the response tokens: one forward of the
    policy trunk; the value of token t is the head on the state that predicts it.
    params: {"model": the LM's nnx.State, "value": the value head}."""
    model = nnx.merge(graphdef, params["model"])
    pred, targets, valid = response_window(batch["loss_mask"], window)
    h_BRD, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"],
                                   select_BQ=pred)
    y_BR = jnp.take_along_axis(batch["tokens"], targets, axis=1)
    logp = token_logps(h_BRD, model.unembedding_VD(), y_BR, chunk)
    head = params["value"]
    values = (jnp.einsum("BRD,D->BR", h_BRD.astype(jnp.float32), head["w_D"].astype(jnp.float32))
              + head["bias"].astype(jnp.float32))
    return jnp.where(valid, logp, 0.0), jnp.where(valid, values, 0.0), valid


def make_ppo_score(graphdef, *, window: int, chunk: int = LOGIT_CHUNK):
    """score(params, ref_model_params, batch) -> (old log-probs, old values, reference log-probs,
    mask), [B, window] each, in one compiled call (nothing differentiated)."""
    def score(params, ref_params, batch):
        logp, values, valid = logps_and_values(graphdef, params, batch, window=window, chunk=chunk)
        ref = nnx.merge(graphdef, ref_params)
        pred, targets, _ = response_window(batch["loss_mask"], window)
        h_BRD, _ = ref.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"],
                                     select_BQ=pred)
        y_BR = jnp.take_along_axis(batch["tokens"], targets, axis=1)
        ref_logp = jnp.where(valid, token_logps(h_BRD, ref.unembedding_VD(), y_BR, chunk), 0.0)
        return logp, values, ref_logp, valid
    return score


def token_rewards(scores_B, logp_BR, ref_logp_BR, valid_BR, kl_coef):
    """Per-token rewards [B, R]: −kl_coef · (log π − log π_ref) at every response token, plus
    the reply's score at its last token; and the per-token KL estimate [B, R]."""
    kl_BR = jnp.where(valid_BR, logp_BR - ref_logp_BR, 0.0)
    last_B = jnp.sum(valid_BR, axis=1) - 1
    at_last_BR = jnp.arange(valid_BR.shape[1])[None] == last_B[:, None]
    rewards = -kl_coef * kl_BR + jnp.where(at_last_BR & valid_BR, scores_B[:, None], 0.0)
    return rewards, kl_BR


def gae(rewards_BR, values_BR, valid_BR, gamma: float, lam: float):
    """Generalised advantage estimation over each row's valid tokens (the value after the last
    token is 0): (advantages, returns = advantages + values), [B, R]."""
    values = jnp.where(valid_BR, values_BR, 0.0)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = jnp.where(valid_BR, rewards_BR + gamma * next_values - values, 0.0)

    def back(carry, x):
        delta, ok = x
        adv = jnp.where(ok, delta + gamma * lam * carry, 0.0)
        return adv, adv

    _, adv_RB = jax.lax.scan(back, jnp.zeros(rewards_BR.shape[0]), (deltas.T, valid_BR.T),
                             reverse=True)
    advantages = adv_RB.T
    return advantages, advantages + values


def masked_whiten(x_BR, valid_BR, eps: float = 1e-8):
    """(x − mean) / std over the valid entries (unbiased variance, as trl's `masked_whiten`)."""
    n = jnp.maximum(jnp.sum(valid_BR), 1)
    mean = jnp.sum(jnp.where(valid_BR, x_BR, 0.0)) / n
    var = jnp.sum(jnp.where(valid_BR, jnp.square(x_BR - mean), 0.0)) / jnp.maximum(n - 1, 1)
    return jnp.where(valid_BR, (x_BR - mean) * jax.lax.rsqrt(var + eps), 0.0)


def advantages(scores_B, old_logp, ref_logp, old_values, valid, kl_coef, hyper: PpoHyper):
    """What the minibatch epochs use: advantages (whitened), returns, and the rollout's KL and
    reward statistics."""
    rewards, kl = token_rewards(scores_B, old_logp, ref_logp, valid, kl_coef)
    adv, returns = gae(rewards, old_values, valid, hyper.gamma, hyper.lam)
    if hyper.whiten_advantages:
        adv = masked_whiten(adv, valid)
    kl_seq = jnp.sum(kl, axis=1)
    stats = {"objective/kl": jnp.mean(kl_seq), "objective/scores": jnp.mean(scores_B),
             "objective/rlhf_reward": jnp.mean(scores_B - kl_coef * kl_seq),
             "objective/non_score_reward": jnp.mean(jnp.sum(rewards, 1) - scores_B)}
    return adv, returns, stats


def ppo_losses(logp, values, old_logp, old_values, adv, returns, valid, hyper: PpoHyper):
    """(total loss, metrics): clipped policy loss + vf_coef · clipped value loss, each a mean over
    the valid tokens (trl's `masked_mean`)."""
    n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n  # noqa: E731
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - hyper.clip, 1 + hyper.clip))
    v_clipped = old_values + jnp.clip(values - old_values, -hyper.clip_value, hyper.clip_value)
    vf = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(v_clipped - returns))
    pg_loss, vf_loss = mean(pg), mean(vf)
    metrics = {
        "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
        "policy/approxkl": 0.5 * mean(jnp.square(log_ratio)),
        "policy/clipfrac": mean((jnp.abs(ratio - 1.0) > hyper.clip).astype(jnp.float32)),
        "val/vf_loss": vf_loss,
        "val/clipfrac": mean((jnp.abs(values - old_values) > hyper.clip_value).astype(jnp.float32)),
        "val/mean": mean(values), "val/ratio": mean(ratio)}
    return pg_loss + hyper.vf_coef * vf_loss, metrics


ROLLOUT_FIELDS = (*FIELDS, "old_logp", "old_values", "advantages", "returns")


def make_ppo_step(graphdef, tx, lr_schedule: Callable, hyper: PpoHyper, *, window: int,
                  chunk: int = LOGIT_CHUNK):
    """step(state, minibatch) -> (state, metrics): one PPO update on a minibatch of rollout rows
    (their SFT layout plus old_logp, old_values, advantages, returns [B, window]).
    state.params = {"model": …, "value": …}; a non-finite loss or gradient skips the update."""
    def loss_of(params, mb):
        logp, values, valid = logps_and_values(graphdef, params, mb, window=window, chunk=chunk)
        return ppo_losses(logp, values, mb["old_logp"], mb["old_values"], mb["advantages"],
                          mb["returns"], valid, hyper)

    def step(state: TrainState, mb) -> tuple[TrainState, dict[str, Any]]:
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, mb)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        lr = lr_schedule(state.step)
        state, norms = apply_update(state, tx, grads, finite)
        return state, {**metrics, "loss": loss, "learning_rate": lr, "finite": finite, **norms}

    return step


@dataclasses.dataclass
class KlController:
    """The KL penalty's coefficient: fixed, or adaptive (Ziegler et al. 2019, as trl): after each
    rollout batch, coef *= 1 + clip(kl / target − 1, ±0.2) · batch_size / horizon."""
    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, batch_size: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * batch_size / self.horizon
