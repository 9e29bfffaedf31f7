"""The PPO loop: rollouts from the engine under each example's own persona, rewards, then PPO
updates (train/ppo.py), with the books kept as the SFT/DPO loop keeps them.

One rollout = `rollout_batch` prompts, each answered once by the current policy (the engine,
sampling); their replies are scored by the reward function (`rewards(personas, replies)`);
the rollout is held against the policy's own log-probs and values and the frozen reference's
log-probs (one compiled call); advantages come from GAE over the KL-penalised rewards; then
`ppo_epochs` passes of shuffled minibatches update the policy and its value head. Every
`eval_every` rollouts the policy answers a fixed set of dev prompts (seeded) and the model with
the highest mean reward is exported (the paper: "the model that achieved the highest reward").
State, rollout index and the KL coefficient are checkpointed, so a resumed run continues
exactly (a rollout's samples and minibatch order depend only on its index).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from pdpo_jax import sharding as shd
from pdpo_jax.checkpoint import Checkpointer
from pdpo_jax.data.batches import bucket_length, sft_batch
from pdpo_jax.data.encode import Encoded
from pdpo_jax.metrics import MetricsWriter
from pdpo_jax.sampling.decode import make_decode_weights
from pdpo_jax.sampling.engine import Engine
from pdpo_jax.sampling.sampler import SamplingConfig
from pdpo_jax.train import ppo
from pdpo_jax.train.state import create_state

log = logging.getLogger(__name__)
Rewards = Callable[[Sequence[Sequence[str]], Sequence[str]], np.ndarray]
ROW_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rollout prompt: its ids, the persona the reward judges the reply against, its index."""
    ids: np.ndarray
    persona: tuple[str, ...]
    index: int


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    """How rollouts are drawn and used (see the module docstring)."""
    rollout_batch: int
    minibatch: int
    ppo_epochs: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_prompt_tokens: int | None = None  # the prompts' budget: one set of sampling programs


class PpoTrainer:
    """PPO on one policy (its LM params + a value head) against its frozen start as reference."""

    def __init__(self, graphdef, lm_params, tokenizer, rewards: Rewards, tx, lr_schedule,
                 plan: RolloutPlan, hyper: ppo.PpoHyper, kl: ppo.KlController, mesh, *,
                 eos_ids: Sequence[int], pad_id: int):
        from pdpo_jax.models.layers import frozen_forward_params
        self.graphdef, self.tokenizer, self.rewards = graphdef, tokenizer, rewards
        self.plan, self.hyper, self.kl, self.mesh, self.pad_id = plan, hyper, kl, mesh, pad_id
        model = nnx.merge(graphdef, lm_params)
        self.ref_params = frozen_forward_params(model)
        params = {"model": lm_params, "value": ppo.init_value_head(model.cfg.d_model)}
        self.state, state_sh = create_state(params, tx, mesh)
        self.sampling = SamplingConfig(plan.max_new_tokens, temperature=plan.temperature,
                                       top_p=plan.top_p, eos_ids=tuple(eos_ids), pad_id=pad_id)
        slots = max(shd.batch_divisor(mesh), plan.rollout_batch - plan.rollout_batch % shd.batch_divisor(mesh))
        self.engine = Engine((graphdef, lm_params), self.sampling, slots=slots, mesh=mesh)
        rows = self._rows = NamedSharding(mesh, P(shd.BATCH_AXES))
        window = plan.max_new_tokens
        self._score = jax.jit(ppo.make_ppo_score(graphdef, window=window))
        self._step = jax.jit(ppo.make_ppo_step(graphdef, tx, lr_schedule, hyper, window=window),
                             in_shardings=(state_sh, rows), out_shardings=(state_sh, None),
                             donate_argnums=(0,))

    # -- one rollout ----------------------------------------------------------------------

    def sample(self, prompts: Sequence[Prompt], seed: int, *, greedy: bool = False):
        """(replies' token ids, decoded texts) of the current policy, keyed by prompt index."""
        self.engine.weights = make_decode_weights(self.graphdef, self.state.params["model"], self.mesh)
        cfg = dataclasses.replace(self.sampling, greedy=greedy, seed=seed)
        out = self.engine.generate([p.ids.tolist() for p in prompts], cfg=cfg,
                                   example_ids=[p.index for p in prompts],
                                   max_prompt_len=self.plan.max_prompt_tokens)
        ids = [out.tokens[i, :out.lengths[i]] for i in range(len(prompts))]
        eos = set(self.sampling.eos_ids)
        texts = [self.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True)
                 .strip() for row in ids]
        return ids, texts

    def batch(self, prompts: Sequence[Prompt], replies: Sequence[np.ndarray]) -> dict:
        """Rollout rows [prompt | reply | pad] in the SFT layout (a bucketed length)."""
        encoded = [Encoded(p.ids, np.asarray(r, np.int32)) for p, r in zip(prompts, replies)]
        T = bucket_length(max(e.length for e in encoded), ROW_BUCKETS)
        batch = sft_batch(encoded, T, self.pad_id)
        batch.pop("index")
        return batch

    def rollout(self, prompts: Sequence[Prompt], r: int) -> tuple[dict, dict]:
        """Sample, reward and score rollout r: (rows with old log-probs, values, advantages and
        returns; rollout statistics)."""
        replies, texts = self.sample(prompts, seed=self.plan.seed + r)
        scores = np.asarray(self.rewards([p.persona for p in prompts], texts), np.float32)
        rows = jax.device_put(self.batch(prompts, replies), self._rows)
        old_logp, old_values, ref_logp, valid = self._score(self.state.params, self.ref_params, rows)
        adv, returns, stats = ppo.advantages(jnp.asarray(scores), old_logp, ref_logp, old_values,
                                             valid, self.kl.coef, self.hyper)
        rows = {**rows, "old_logp": old_logp, "old_values": old_values, "advantages": adv,
                "returns": returns}
        lengths = np.asarray(jnp.sum(valid, axis=1))
        stats = {**{k: float(v) for k, v in stats.items()}, "objective/kl_coef": self.kl.coef,
                 "rollout/reply_tokens": float(lengths.mean())}
        return rows, stats

    def update(self, rows: dict, r: int) -> dict:
        """`ppo_epochs` passes of shuffled minibatches; the mean of each update metric."""
        n, mb = len(rows["tokens"]), self.plan.minibatch
        history = []
        for epoch in range(self.plan.ppo_epochs):
            order = np.random.default_rng([self.plan.seed, r, epoch]).permutation(n)
            for lo in range(0, n - n % mb, mb):
                take = jnp.asarray(order[lo:lo + mb])
                minibatch = jax.device_put({k: v[take] for k, v in rows.items()}, self._rows)
                self.state, metrics = self._step(self.state, minibatch)
                history.append(metrics)
        history = jax.device_get(history)
        if not all(bool(m["finite"]) for m in history):
            raise FloatingPointError(f"rl: non-finite loss or gradient in rollout {r}; the update "
                                     "was skipped. Lower rl.optimizer.lr or check the rewards")
        return {k: float(np.mean([m[k] for m in history])) for k in history[0] if k != "finite"}

    def dev_reward(self, prompts: Sequence[Prompt]) -> dict:
        """Mean reward of the policy's greedy replies to the dev prompts."""
        _, texts = self.sample(prompts, seed=self.plan.seed, greedy=True)
        scores = np.asarray(self.rewards([p.persona for p in prompts], texts), np.float64)
        return {"scores": float(scores.mean()), "scores_std": float(scores.std())}


@dataclasses.dataclass(frozen=True)
class LoopBooks:
    """Where the loop keeps its books: the checkpointer, the metrics writer, the exporter."""
    ckpt: Checkpointer
    writer: MetricsWriter
    export: Callable[[object, dict], None]
    meta: dict


def run_ppo(trainer: PpoTrainer, train: Sequence[Prompt], dev: Sequence[Prompt], *,
            rollouts: int, eval_every: int, books: LoopBooks) -> dict | None:
    """Trains for `rollouts` rollout batches (resuming from the checkpoint), exporting the
    policy with the best dev reward; returns the best {rollout, value}."""
    start, best = _restore(trainer, books)
    bar = tqdm(total=rollouts, initial=start, desc="rl", unit="rollout", dynamic_ncols=True)
    for r in range(start, rollouts):
        t0 = time.perf_counter()
        prompts = _rollout_prompts(train, trainer.plan, r)
        rows, stats = trainer.rollout(prompts, r)
        stats |= trainer.update(rows, r)
        trainer.kl.update(stats["objective/kl"], trainer.plan.rollout_batch)
        stats["rollout/seconds"] = time.perf_counter() - t0
        books.writer.write(r + 1, stats, prefix="train/")
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if (r + 1) % eval_every == 0 or r + 1 == rollouts:
            dev_stats = trainer.dev_reward(dev)
            books.writer.write(r + 1, dev_stats, prefix="eval/")
            if best is None or dev_stats["scores"] > best["value"]:
                books.export(trainer.state.params["model"], {"rollout": r + 1, **dev_stats})
                best = {"rollout": r + 1, "value": dev_stats["scores"]}
            books.ckpt.save(r + 1, trainer.state, {"rollout": r + 1, "kl_coef": trainer.kl.coef},
                            {**books.meta, "best": best})
    bar.close()
    return best


def _restore(trainer: PpoTrainer, books: LoopBooks) -> tuple[int, dict | None]:
    if books.ckpt.latest_step() is None:
        return 0, None
    trainer.state, saved, meta = books.ckpt.restore(trainer.state, books.meta)
    trainer.kl.coef = float(saved["kl_coef"])
    return int(saved["rollout"]), meta.get("best")


def _rollout_prompts(train: Sequence[Prompt], plan: RolloutPlan, r: int) -> list[Prompt]:
    """Rollout r's prompts: epoch e = r // per_epoch walks a seeded permutation of the set."""
    per_epoch = max(len(train) // plan.rollout_batch, 1)
    epoch, k = divmod(r, per_epoch)
    order = np.random.default_rng([plan.seed, epoch]).permutation(len(train))
    return [train[i] for i in order[k * plan.rollout_batch:(k + 1) * plan.rollout_batch]]
