"""SFT and DPO training steps: pure functions of (state, [ref_params,] batch), jitted once.

Batches carry a leading micro-batch axis A (gradient accumulation): every leaf is [A, B, ...].
Gradients are summed over micro-batches and normalised once by the global count (response
tokens for SFT, real pairs for DPO), so A×B equals one step of A·B exactly.
A non-finite loss or gradient leaves params and optimizer state untouched and is reported
in `metrics["finite"]`; the loop stops on it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pdpo_jax.config import ConfigError, DpoSection
from pdpo_jax.train import losses
from pdpo_jax.train.logprobs import (LOGIT_CHUNK, owner_sums, packed_logps, response_logps,
                                     sequence_logps, shared_prompt_logps)

FIELDS = ("tokens", "positions", "attention_mask", "loss_mask")
PACKED_FIELDS = ("tokens", "positions", "segments", "pred", "target", "valid")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the policy's parameters
    opt_state: Any


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def apply_update(state: TrainState, tx, grads, finite):
    """The optimizer update of `grads` when `finite`, else state unchanged; with the norms.
    Shared by every objective's step (SFT, DPO, the reward classifier's).

    A `lax.cond`, not `where(finite, new, old)` per leaf: the select reads the old params and
    moments after the new ones are computed into their donated buffers, so XLA copies the
    whole state at entry to keep the old values (SmolLM2-135M SFT step: +1.5 GiB live, +709 MiB
    of peak temp; `bench/memory_probe.py`). A skipped step reports update_norm 0."""
    def update(state):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), optax.tree.norm(updates)

    def skip(state):
        return state, jnp.zeros((), jnp.float32)

    new, update_norm = jax.lax.cond(finite, update, skip, state)
    norms = {"grad_norm": optax.tree.norm(grads), "update_norm": update_norm,
             "param_norm": optax.tree.norm(new.params)}
    return new, norms


def accumulate(body, init, batch):
    """Folds `body(carry, micro_batch) -> (carry, None)` over the leading micro-batch axis;
    a single micro-batch runs without a loop (XLA keeps the step one straight-line graph)."""
    if jax.tree.leaves(batch)[0].shape[0] == 1:
        return body(init, jax.tree.map(lambda x: x[0], batch))[0]
    return jax.lax.scan(body, init, batch)[0]


def response_token_logps(model, mb, *, window, chunk):
    """(log-probs, mask) of an SFT micro-batch's response tokens: one row per record, or
    records packed side by side (`data.packing`: the batch has `segments`)."""
    if "segments" in mb:
        return packed_logps(model, *(mb[f] for f in PACKED_FIELDS), chunk=chunk), mb["valid"]
    return response_logps(model, *(mb[f] for f in FIELDS), window=window, chunk=chunk)


def make_sft_step(graphdef: nnx.GraphDef, tx, lr_schedule: Callable, *, window: int | None,
                  chunk: int = LOGIT_CHUNK):
    """step(state, batch) -> (state, metrics); token-normalised next-token NLL on responses."""
    def nll(params, mb):
        model = nnx.merge(graphdef, params)
        logp, valid = response_token_logps(model, mb, window=window, chunk=chunk)
        return losses.token_nll_sum(logp, valid)

    def step(state: TrainState, batch):
        def body(carry, mb):
            grads, nll_sum, count = carry
            (micro_nll, micro_count), g = jax.value_and_grad(nll, has_aux=True)(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), nll_sum + micro_nll, count + micro_count), None

        init = (_zeros_like(state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        grads, nll_sum, count = accumulate(body, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll_sum / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        lr = lr_schedule(state.step)
        state, norms = apply_update(state, tx, grads, finite)
        return state, {"loss": loss, "tokens": count, "learning_rate": lr, "finite": finite, **norms}

    return step


def pair_logps(graphdef, params, mb, *, window, chunk, share_prompt: bool = False):
    """Log-prob sums and lengths of chosen and rejected, 4 arrays [B], in one forward: the
    two sides concatenated on the batch axis, or (share_prompt) packed into one row per pair
    that holds the prompt once (`shared_prompt_logps`; needs a window)."""
    model = nnx.merge(graphdef, params)
    if "segments" in mb:  # pairs packed side by side, each [prompt | chosen | rejected]
        logp = packed_logps(model, *(mb[f] for f in PACKED_FIELDS), chunk=chunk)
        sums, lengths = owner_sums(logp, mb["valid"], mb["owner"], mb["side"],
                                   mb["examples"].shape[0])
        return sums[:, 0], sums[:, 1], lengths[:, 0], lengths[:, 1]
    if share_prompt:
        if window is None:
            raise ValueError("share_prompt needs a response window (data.max_response_tokens)")
        side = lambda s: {f: mb[f"{s}_{f}"] for f in FIELDS}  # noqa: E731
        (lc, vc), (lr, vr) = shared_prompt_logps(model, side("chosen"), side("rejected"),
                                                 window=window, chunk=chunk)
        return lc.sum(axis=1), lr.sum(axis=1), vc.sum(axis=1), vr.sum(axis=1)
    both = {f: jnp.concatenate([mb["chosen_" + f], mb["rejected_" + f]]) for f in FIELDS}
    logp_sum, length = sequence_logps(model, both, window=window, chunk=chunk)
    b = mb["chosen_tokens"].shape[0]
    return logp_sum[:b], logp_sum[b:], length[:b], length[b:]


def reference_logps(graphdef, ref_params, mb, *, window, chunk, precomputed: bool,
                    share_prompt: bool = False):
    """Reference log-prob sums of chosen and rejected [B], never differentiated: from the
    frozen reference params, or from the batch when they were precomputed once on disk."""
    if precomputed:
        return mb["ref_chosen_logps"], mb["ref_rejected_logps"]
    rc, rr, _, _ = pair_logps(graphdef, ref_params, mb, window=window, chunk=chunk,
                              share_prompt=share_prompt)
    return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)


@dataclasses.dataclass(frozen=True)
class DpoObjective:
    """The per-pair preference loss the DPO step minimises (static: part of the compiled step):
    Σᵢ wᵢ · lossᵢ over `loss` (one name or several, `losses.PREFERENCE_LOSSES`) with
    `loss_weights` (default all 1), plus `rpo_alpha` times RPO's per-token NLL of the chosen reply.
    The defaults are the neutral values: a hyperparameter no selected loss reads must keep its
    default (ConfigError otherwise), so a setting never silently does nothing."""
    loss: str | tuple[str, ...] = "sigmoid"
    beta: float = 0.5
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    loss_weights: tuple[float, ...] | None = None
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    orpo_lambda: float = 0.1

    def __post_init__(self):
        if not isinstance(self.loss, str):  # lists (from code) become tuples: hashable, static
            object.__setattr__(self, "loss", tuple(self.loss))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        if len(self.weights) != len(self.names):
            raise ConfigError(f"dpo.loss_weights: {len(self.weights)} weight(s) for "
                              f"{len(self.names)} loss(es) {list(self.names)}; give one per loss")
        try:
            losses.check_hyperparameters(self.names, self.hyperparameters)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_section(cls, dpo: DpoSection) -> "DpoObjective":
        """The objective a config's `dpo:` section describes (ConfigError if a setting would
        have no effect)."""
        return cls(**{f.name: getattr(dpo, f.name) for f in dataclasses.fields(cls)})

    @property
    def names(self) -> tuple[str, ...]:
        return (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)

    @property
    def weights(self) -> tuple[float, ...]:
        if self.loss_weights is None:
            return (1.0,) * len(self.names)
        return self.loss_weights

    @property
    def hyperparameters(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in losses.NEUTRAL}

    @property
    def needs_reference(self) -> bool:
        """False when every selected loss is reference-free: the step then runs no reference
        forward and reads no reference log-probs (they enter the losses and metrics as 0)."""
        return not set(self.names) <= losses.REFERENCE_FREE

    def __call__(self, lp: losses.PairLogps):
        per_pair = losses.weighted_preference_loss(self.names, self.weights, lp,
                                                   **self.hyperparameters)
        if self.rpo_alpha:
            per_pair = per_pair + self.rpo_alpha * losses.rpo_nll(lp)
        return per_pair


def _reference_fn(graphdef, objective: DpoObjective, *, window, chunk, precomputed, share_prompt):
    """ref(ref_params, mb) -> reference log-prob sums (chosen, rejected) [B]; zeros, with no
    forward and `ref_params` unread, when the objective needs no reference."""
    def reference(ref_params, mb):
        if not objective.needs_reference:
            zeros = jnp.zeros(mb["chosen_tokens"].shape[:1], jnp.float32)
            return zeros, zeros
        return reference_logps(graphdef, ref_params, mb, window=window, chunk=chunk,
                               precomputed=precomputed, share_prompt=share_prompt)
    return reference


def make_dpo_step(graphdef: nnx.GraphDef, tx, lr_schedule: Callable, objective: DpoObjective, *,
                  window: int | None, chunk: int = LOGIT_CHUNK, precomputed_ref: bool = False,
                  share_prompt: bool = False):
    """step(state, ref_params, batch) -> (state, metrics).

    Reference log-probs come first, under stop_gradient and outside value_and_grad (or from
    the batch's `ref_chosen_logps`/`ref_rejected_logps` when precomputed); `ref_params` is a
    separate frozen argument, ignored (may be None) when `objective.needs_reference` is False.
    Metrics are trl's, averaged over the real pairs of the global batch.
    share_prompt: each forward runs the prompt once per pair (see `pair_logps`).
    """
    reference = _reference_fn(graphdef, objective, window=window, chunk=chunk,
                              precomputed=precomputed_ref, share_prompt=share_prompt)

    def step(state: TrainState, ref_params, batch):
        def body(carry, mb):
            grads, sums = carry
            ref_c, ref_r = reference(ref_params, mb)

            def loss_of(params):
                pc, pr, nc, nr = pair_logps(graphdef, params, mb, window=window, chunk=chunk,
                                            share_prompt=share_prompt)
                lp = losses.PairLogps(pc, pr, ref_c, ref_r, nc, nr)
                real = lp.real  # padding rows carry no response
                per_pair = jnp.where(real, objective(lp), 0.0)
                stats = {k: jnp.sum(jnp.where(real, v, 0.0))
                         for k, v in losses.preference_metrics(lp, objective.beta).items()}
                return jnp.sum(per_pair), {"pairs": jnp.sum(real), **stats}

            (loss_sum, stats), g = jax.value_and_grad(loss_of, has_aux=True)(state.params)
            sums = jax.tree.map(jnp.add, sums, {"loss": loss_sum, **stats})
            return (jax.tree.map(jnp.add, grads, g), sums), None

        zero_stats = {k: jnp.zeros((), jnp.float32) for k in ("loss", *losses.METRIC_NAMES)}
        zero_stats["pairs"] = jnp.zeros((), jnp.int32)
        grads, sums = accumulate(body, (_zeros_like(state.params), zero_stats), batch)
        pairs = jnp.maximum(sums.pop("pairs"), 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / pairs, grads)
        metrics = {k: v / pairs for k, v in sums.items()}
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
        lr = lr_schedule(state.step)
        state, norms = apply_update(state, tx, grads, finite)
        return state, {**metrics, "pairs": pairs, "learning_rate": lr, "finite": finite, **norms}

    return step


def make_dpo_eval(graphdef, objective: DpoObjective, *, window, chunk=LOGIT_CHUNK,
                  precomputed_ref=False, share_prompt: bool = False):
    """eval(params, ref_params, batch [B,...]) -> per-metric sums and the pair count;
    `ref_params` as in `make_dpo_step`."""
    reference = _reference_fn(graphdef, objective, window=window, chunk=chunk,
                              precomputed=precomputed_ref, share_prompt=share_prompt)

    def evaluate(params, ref_params, mb):
        rc, rr = reference(ref_params, mb)
        pc, pr, nc, nr = pair_logps(graphdef, params, mb, window=window, chunk=chunk,
                                    share_prompt=share_prompt)
        lp = losses.PairLogps(pc, pr, rc, rr, nc, nr)
        real = lp.real
        out = {k: jnp.sum(jnp.where(real, v, 0.0))
               for k, v in losses.preference_metrics(lp, objective.beta).items()}
        out["loss"] = jnp.sum(jnp.where(real, objective(lp), 0.0))
        return out, jnp.sum(real)
    return evaluate


def make_sft_eval(graphdef, *, window, chunk=LOGIT_CHUNK):
    """eval(params, batch [B,...]) -> (NLL sum, token count)."""
    def evaluate(params, mb):
        model = nnx.merge(graphdef, params)
        logp, valid = response_token_logps(model, mb, window=window, chunk=chunk)
        return losses.token_nll_sum(logp, valid)
    return evaluate
