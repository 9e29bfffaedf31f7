"""PPO's pieces against numpy written here: per-token KL rewards, GAE, whitening, the clipped
losses, the adaptive KL controller."""
import jax.numpy as jnp
import numpy as np
import pytest

from pdpo_jax.train import ppo

RNG = np.random.default_rng(0)
B, R = 3, 6
LENGTHS = np.array([6, 3, 1])
VALID = np.arange(R)[None] < LENGTHS[:, None]


def _np_gae(rewards, values, lengths, gamma, lam):
    adv = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, adv + np.where(VALID, values, 0.0)


def test_token_rewards_put_the_score_on_the_last_token():
    logp, ref = RNG.normal(size=(B, R)), RNG.normal(size=(B, R))
    scores = np.array([1.5, -2.0, 0.25])
    rewards, kl = ppo.token_rewards(jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref),
                                    jnp.asarray(VALID), 0.1)
    want_kl = np.where(VALID, logp - ref, 0.0)
    want = -0.1 * want_kl
    for b, n in enumerate(LENGTHS):
        want[b, n - 1] += scores[b]
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_the_recursion(gamma, lam):
    rewards, values = RNG.normal(size=(B, R)), RNG.normal(size=(B, R))
    adv, returns = ppo.gae(jnp.asarray(np.where(VALID, rewards, 0.0)), jnp.asarray(values),
                           jnp.asarray(VALID), gamma, lam)
    want_adv, want_ret = _np_gae(rewards, values, LENGTHS, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(VALID, returns, 0), np.where(VALID, want_ret, 0), rtol=1e-5, atol=1e-6)


def test_whitening_uses_the_valid_entries_only():
    x = RNG.normal(3.0, 2.0, size=(B, R))
    got = np.asarray(ppo.masked_whiten(jnp.asarray(x), jnp.asarray(VALID)))
    v = x[VALID]
    np.testing.assert_allclose(got[VALID], (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), rtol=1e-5)
    assert (got[~VALID] == 0).all()


def test_clipped_losses_and_metrics():
    hyper = ppo.PpoHyper(clip=0.2, clip_value=0.2, vf_coef=0.1)
    logp, old = RNG.normal(size=(B, R)) * 0.3, RNG.normal(size=(B, R)) * 0.3
    values, old_v = RNG.normal(size=(B, R)), RNG.normal(size=(B, R))
    adv, ret = RNG.normal(size=(B, R)), RNG.normal(size=(B, R))
    loss, m = ppo.ppo_losses(*map(jnp.asarray, (logp, values, old, old_v, adv, ret, VALID)), hyper)
    ratio = np.exp(logp - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))[VALID].mean()
    vclip = old_v + np.clip(values - old_v, -0.2, 0.2)
    vf = (0.5 * np.maximum((values - ret) ** 2, (vclip - ret) ** 2))[VALID].mean()
    np.testing.assert_allclose(loss, pg + 0.1 * vf, rtol=1e-5)
    np.testing.assert_allclose(m["policy/approxkl"], (0.5 * (logp - old) ** 2)[VALID].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["policy/clipfrac"], (np.abs(ratio - 1) > 0.2)[VALID].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["val/clipfrac"], (np.abs(values - old_v) > 0.2)[VALID].mean(), rtol=1e-6)


def test_adaptive_kl_controller():
    fixed = ppo.KlController(0.05)
    fixed.update(10.0, 8)
    assert fixed.coef == 0.05
    adaptive = ppo.KlController(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)  # error clipped to +0.2
    assert adaptive.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    adaptive.update(5.4, 10)   # error -0.1
    assert adaptive.coef == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


# --------------------------------------------------------------------------------------------
# The loop on a tiny model with a reward computed in closed form

import jax  # noqa: E402

from pdpo_jax import sharding  # noqa: E402
from pdpo_jax.checkpoint import Checkpointer  # noqa: E402
from pdpo_jax.config import OptimizerConfig  # noqa: E402
from pdpo_jax.metrics import MetricsWriter  # noqa: E402
from pdpo_jax.models import ModelConfig  # noqa: E402
from pdpo_jax.train import optim, rl, state as st  # noqa: E402

TARGET = 7  # the reward: how often the reply says token 7


class _Ids:
    """A stand-in tokenizer: a reply decodes to its ids, space-separated."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(t)) for t in ids)


def _count_target(personas, replies):
    return np.asarray([r.split().count(str(TARGET)) / max(len(r.split()), 1) for r in replies])


def _trainer(mesh_shape=(1, 1, 1), lr=3e-3, rollout_batch=16):
    cfg = ModelConfig(arch="llama", vocab_size=32, d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, max_positions=64)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    graphdef, params = st.init_params(cfg, mesh, seed=0)
    tx, sched = optim.make_optimizer(OptimizerConfig(lr=lr, warmup_ratio=0.0, schedule="constant"), 100)
    plan = rl.RolloutPlan(rollout_batch=rollout_batch, minibatch=8, ppo_epochs=2, max_new_tokens=8, seed=1)
    return rl.PpoTrainer(graphdef, params, _Ids(), _count_target, tx, sched, plan, ppo.PpoHyper(),
                         ppo.KlController(0.05), mesh, eos_ids=(), pad_id=0)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rl.Prompt(rng.integers(1, 32, rng.integers(3, 9)).astype(np.int32), ("p",), i)
            for i in range(n)]


def _books(tmp_path, name):
    return rl.LoopBooks(Checkpointer(tmp_path / name / "ckpt", keep=2),
                        MetricsWriter(tmp_path / name, tensorboard=False), lambda p, m: None,
                        {"stage": "rl"})


def test_ppo_raises_a_closed_form_reward_and_keeps_kl_bounded(tmp_path):
    """Reward = share of token 7 in the reply (random start: ~1/32). After 12 rollouts of 16
    prompts the mean reward of the rollouts has at least doubled, and the KL to the reference
    stays below a few nats per reply."""
    trainer = _trainer()
    prompts = _prompts(64)
    books = _books(tmp_path, "learn")
    rl.run_ppo(trainer, prompts, prompts[:8], rollouts=12, eval_every=6, books=books)
    rows = [r for r in _read(tmp_path / "learn" / "metrics.jsonl") if "train/objective/scores" in r]
    first = np.mean([r["train/objective/scores"] for r in rows[:2]])
    last = np.mean([r["train/objective/scores"] for r in rows[-2:]])
    assert last > 2 * first + 0.05, (first, last)
    assert max(r["train/objective/kl"] for r in rows) < 5.0
    for key in ("train/policy/approxkl", "train/policy/clipfrac", "train/val/vf_loss"):
        assert key in rows[-1]


def _read(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    prompts = _prompts(32, seed=2)
    whole = _trainer(rollout_batch=8)
    rl.run_ppo(whole, prompts, prompts[:4], rollouts=4, eval_every=1, books=_books(tmp_path, "a"))
    first = _trainer(rollout_batch=8)
    rl.run_ppo(first, prompts, prompts[:4], rollouts=2, eval_every=1, books=_books(tmp_path, "b"))
    resumed = _trainer(rollout_batch=8)  # a new process would start like this
    rl.run_ppo(resumed, prompts, prompts[:4], rollouts=4, eval_every=1, books=_books(tmp_path, "b"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(whole.state.params))
    assert resumed.kl.coef == whole.kl.coef


def test_sharded_ppo_update_equals_one_device():
    """One rollout scored and updated on (data=2, fsdp=2, tensor=2) against one device."""
    prompts = _prompts(16, seed=3)
    out = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        trainer = _trainer(mesh_shape=shape)
        rows, stats = trainer.rollout(prompts, 0)
        metrics = trainer.update(rows, 0)
        out.append((stats, metrics, jax.device_get(trainer.state.params)))
    (s1, m1, p1), (s8, m8, p8) = out
    for k in s1:
        np.testing.assert_allclose(s8[k], s1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)
