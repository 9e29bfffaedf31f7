"""AdamW as in the paper's Appendix B: warmup then cosine (SFT) or linear (DPO) decay to 0,
global-norm clipping, and no weight decay on norms and biases."""
from __future__ import annotations

import math

import jax
import optax

from pdpo_jax.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio * total) steps from 0, then decay to 0 at `total`
    (the shape of transformers' get_{cosine,linear}_schedule_with_warmup)."""
    total = max(int(total_steps), 1)
    warmup = min(math.ceil(cfg.warmup_ratio * total), total)
    decay = max(total - warmup, 1)
    ramp = optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
    tail = {"cosine": optax.cosine_decay_schedule(cfg.lr, decay),
            "linear": optax.linear_schedule(cfg.lr, 0.0, decay),
            "constant": optax.constant_schedule(cfg.lr)}[cfg.schedule]
    if warmup == 0:
        return tail
    return optax.join_schedules([ramp, tail], [warmup])


def decays(path) -> bool:
    """Weight decay applies to matrices and embeddings, not to norms or biases."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any("bias" in n or "norm" in n or n.startswith("ln_") for n in names)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
    """(optax transformation, learning-rate schedule)."""
    lr = schedule(cfg, total_steps)
    mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask),
    )
    return tx, lr
