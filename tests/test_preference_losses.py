"""The loss menu: every preference loss against its formula in numpy (written here) and, for every
loss trl 1.16 implements, against trl live on the same log-probs; weighted lists; reference-free
objectives in the compiled step; config errors.

trl is called, not transcribed: `DPOTrainer._compute_loss` runs as an unbound method on a minimal
object whose "model" returns per-token log-probs that sum to our per-pair log-prob sums (the whole
sum on the first reply token, 0 elsewhere, so trl's sums are exact), with the reference log-probs
precomputed in the batch. SimPO is trl's `CPOTrainer.cpo_loss` (`loss_type="simpo"`) and ORPO's
odds-ratio term `ORPOTrainer.odds_ratio_loss`, both called on the per-token mean log-probs.
"""
import collections
import os
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from batches import micro  # noqa: E402
from pdpo_jax.config import ConfigError, DpoSection, load_config  # noqa: E402
from pdpo_jax.config.schema import LossName  # noqa: E402
from pdpo_jax.train import losses  # noqa: E402
from pdpo_jax.train.steps import DpoObjective, make_dpo_eval  # noqa: E402

HYPER = dict(beta=0.5, label_smoothing=0.1, simpo_gamma=0.3, discopop_tau=0.05, orpo_lambda=0.2)
BATCH_LEVEL = {"sft", "aot", "aot_unpaired", "orpo"}  # a pair's loss depends on the others
TRL_DPO = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
           "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return np.exp(_log_sigmoid(x))


def _smoothed(z, eps):
    return -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)


def _sft(a, h):
    return np.full_like(a["pc"], -a["pc"].sum() / max(a["nc"].sum(), 1))


def _log_odds(a):
    c, r = a["pc"] / a["nc"], a["pr"] / a["nr"]
    return (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))


def _exo(a, h):
    z, eps = h["beta"] * a["delta"], h["label_smoothing"]
    return (_sigmoid(z) * (_log_sigmoid(z) - np.log(1 - eps))
            + _sigmoid(-z) * (_log_sigmoid(-z) - np.log(eps)))


def _robust(a, h):
    z, eps = h["beta"] * a["delta"], h["label_smoothing"]
    return (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps)


def _discopop(a, h):
    """Eq. 5 with ρ = βΔ, written naively (float64 has the range these inputs need)."""
    rho = h["beta"] * a["delta"]
    m = _sigmoid(rho / h["discopop_tau"])
    return (1 - m) * -_log_sigmoid(rho) + m * np.exp(-rho)


def _aot(a, h):
    delta = np.sort(a["pc"] - a["pr"]) - np.sort(a["rc"] - a["rr"])
    return _smoothed(h["beta"] * delta, h["label_smoothing"])


def _simpo(a, h):
    z = h["beta"] * (a["pc"] / a["nc"] - a["pr"] / a["nr"]) - h["simpo_gamma"]
    return _smoothed(z, h["label_smoothing"])


# Each loss's formula [B] over float64 arrays a: pc, pr, rc, rr (policy/reference log-prob sums of
# chosen/rejected), nc, nr (lengths ≥ 1), c = pc − rc, r = pr − rr, delta = c − r; h the
# hyperparameters. Written from the papers / trl's docs, not from our code.
NUMPY = {
    "sigmoid": lambda a, h: -_log_sigmoid(h["beta"] * a["delta"]),
    "cdpo": lambda a, h: _smoothed(h["beta"] * a["delta"], h["label_smoothing"]),
    "hinge": lambda a, h: np.maximum(0.0, 1 - h["beta"] * a["delta"]),
    "ipo": lambda a, h: ((a["c"] / a["nc"] - a["r"] / a["nr"]) - 1 / (2 * h["beta"])) ** 2,
    "exo_pair": _exo,
    "nca_pair": lambda a, h: (-_log_sigmoid(h["beta"] * a["c"])
                              - 0.5 * _log_sigmoid(-h["beta"] * a["c"])
                              - 0.5 * _log_sigmoid(-h["beta"] * a["r"])),
    "robust": _robust,
    "bco_pair": lambda a, h: -_log_sigmoid(h["beta"] * a["c"]) - _log_sigmoid(-h["beta"] * a["r"]),
    "sppo_hard": lambda a, h: (a["c"] - 0.5 / h["beta"]) ** 2 + (a["r"] + 0.5 / h["beta"]) ** 2,
    "aot": _aot,
    "aot_unpaired": lambda a, h: _smoothed(h["beta"] * (np.sort(a["c"]) - np.sort(a["r"])),
                                           h["label_smoothing"]),
    "apo_zero": lambda a, h: 1 - _sigmoid(h["beta"] * a["c"]) + _sigmoid(h["beta"] * a["r"]),
    "apo_down": lambda a, h: _sigmoid(h["beta"] * a["c"]) + 1 - _sigmoid(h["beta"] * a["delta"]),
    "discopop": _discopop,
    "sigmoid_norm": lambda a, h: -_log_sigmoid(h["beta"] * (a["c"] / a["nc"] - a["r"] / a["nr"])),
    "sft": _sft,
    "simpo": _simpo,
    "orpo": lambda a, h: _sft(a, h) - h["orpo_lambda"] * _log_sigmoid(_log_odds(a)),
}


def _pairs():
    """16 random pairs plus edge cases: all four log-probs equal, large positive and negative
    margins (βΔ = ±62.5), one-token replies, a reply of mean log-prob −0.01 (ORPO's odds near
    p = 1). Values are multiples of 1/64, so sums and differences are exact in fp32."""
    rng = np.random.default_rng(0)
    logps = np.round(rng.normal(-40, 10, (4, 16)) * 64) / 64
    lengths = rng.integers(1, 30, (2, 16))
    edge = np.array([[-20.0, -5.0, -80.0, -3.0, -0.25],     # policy chosen
                     [-20.0, -80.0, -5.0, -3.5, -12.0],     # policy rejected
                     [-20.0, -60.0, -10.0, -3.0, -11.0],    # reference chosen
                     [-20.0, -10.0, -60.0, -3.25, -13.0]])  # reference rejected
    edge_len = np.array([[5, 20, 20, 1, 25], [5, 20, 20, 1, 10]])
    logps, lengths = np.concatenate([logps, edge], 1), np.concatenate([lengths, edge_len], 1)
    return tuple(logps.astype(np.float32)) + tuple(lengths.astype(np.int32))


def _lp(arrays):
    return losses.PairLogps(*(jnp.asarray(x) for x in arrays))


def _numpy_args(arrays):
    pc, pr, rc, rr, nc, nr = (np.asarray(x, np.float64) for x in arrays)
    c, r = pc - rc, pr - rr
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, c=c, r=r, delta=c - r)


def _ours(name, arrays, **hyper):
    hyper = {k: v for k, v in (hyper or HYPER).items() if k in losses.reads(name)}
    return np.asarray(losses.preference_loss(name, _lp(arrays), **hyper), np.float64)


def test_menu_is_trls_plus_ours_and_config_names_it():
    import typing
    from trl import DPOConfig
    trl_names = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert all(f"'{n}'" in trl_names for n in TRL_DPO)
    assert set(losses.PREFERENCE_LOSSES) == set(TRL_DPO) | {"cdpo", "simpo", "orpo"} == set(NUMPY)
    assert set(typing.get_args(LossName)) == set(losses.PREFERENCE_LOSSES)
    # DpoObjective's defaults are the neutral values, and the config's defaults are both
    assert DpoObjective.from_section(DpoSection()) == DpoObjective()
    neutral = {k: v for k, v in losses.NEUTRAL.items() if v is not None}
    assert {k: getattr(DpoObjective(), k) for k in neutral} == neutral


# fp32 against float64 on inputs exact in fp32: rtol 1e-5 covers the functions' own rounding
# (observed ≤ 4e-6 relative, exo_pair's). atol 1e-7: apo_zero/apo_down compute 1 − σ(·) + σ(·),
# whose fp32 rounding (~6e-8) is absolute, and come out ~1e-7 on saturated pairs.
@pytest.mark.parametrize("name", sorted(NUMPY))
def test_loss_matches_numpy_formula(name):
    arrays = _pairs()
    np.testing.assert_allclose(_ours(name, arrays), NUMPY[name](_numpy_args(arrays), HYPER),
                               rtol=1e-5, atol=1e-7)


def test_discopop_is_finite_where_the_naive_formula_overflows_fp32():
    """ρ = βΔ = −200: e^(−ρ) overflows fp32 (trl computes inf·0 = NaN); float64 gives −log σ(ρ)."""
    arrays = (*(np.array([x], np.float32) for x in (-400.0, 0.0, 0.0, 0.0)),
              *(np.array([4], np.int32) for _ in range(2)))
    got = _ours("discopop", arrays, beta=0.5, discopop_tau=0.05)
    np.testing.assert_allclose(got, NUMPY["discopop"](_numpy_args(arrays), HYPER | {"beta": 0.5}),
                               rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NUMPY))
def test_padding_rows_change_nothing_and_gradients_stay_finite(name):
    """A padding row (no replies: log-probs 0, lengths 0) inserted mid-batch: the masked sum over
    pairs is the unpadded one, and the gradient w.r.t. every log-prob is finite (the zero-length
    guards: lengths clamp to 1, ORPO's odds cap p below 1, AOT sorts padding out)."""
    arrays = _pairs()
    padded = tuple(np.insert(x, 3, 0) for x in arrays)
    hyper = {k: v for k, v in HYPER.items() if k in losses.reads(name)}

    def masked_sum(policy_chosen, policy_rejected):
        lp = losses.PairLogps(policy_chosen, policy_rejected, *(jnp.asarray(x) for x in padded[2:]))
        return jnp.sum(jnp.where(lp.real, losses.preference_loss(name, lp, **hyper), 0.0))

    total, grads = jax.value_and_grad(masked_sum, argnums=(0, 1))(jnp.asarray(padded[0]),
                                                                  jnp.asarray(padded[1]))
    np.testing.assert_allclose(total, _ours(name, arrays).sum(), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert all(float(g[3]) == 0.0 for g in grads)  # the padding row gets no gradient


def test_aot_total_ignores_pair_order():
    arrays = _pairs()
    order = np.random.default_rng(1).permutation(len(arrays[0]))
    for name in ("aot", "aot_unpaired"):
        shuffled = tuple(x[order] for x in arrays)
        np.testing.assert_allclose(_ours(name, shuffled).sum(), _ours(name, arrays).sum(),
                                   rtol=1e-6)


def test_reference_free_set_is_exactly_the_losses_that_ignore_the_reference():
    arrays = _pairs()
    moved = arrays[:2] + (arrays[2] - 7.0, arrays[3] + 3.0) + arrays[4:]
    for name in losses.PREFERENCE_LOSSES:
        unchanged = np.array_equal(_ours(name, arrays), _ours(name, moved))
        assert unchanged == (name in losses.REFERENCE_FREE), name
    assert not DpoObjective(("simpo", "orpo", "sft")).needs_reference
    assert DpoObjective(("simpo", "sigmoid")).needs_reference


# --- trl live ------------------------------------------------------------------------------------

class _StubModel:
    """Stands in for trl's policy: returns the given per-token log-probs, in eval mode."""
    training = False

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def _trl_dpo(loss_types, arrays, weights=None, **hyper):
    """trl 1.16's DPO loss (and its metrics) on our per-pair log-prob sums."""
    from trl import DPOTrainer
    pc, pr, rc, rr, nc, nr = arrays
    n = np.concatenate([nc, nr])
    T = int(n.max()) + 2
    completion = (np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] <= n[:, None])
    per_token = np.zeros((2 * len(pc), T - 1), np.float32)
    per_token[:, 0] = np.concatenate([pc, pr])  # position 0 of the shifted row: reply token 1
    outputs = types.SimpleNamespace(log_probs=torch.tensor(per_token),
                                    entropy=torch.zeros(per_token.shape),
                                    mean_logits=torch.zeros(per_token.shape),
                                    is_top1=torch.zeros(per_token.shape, dtype=torch.bool))
    model = _StubModel(outputs)
    h = HYPER | hyper
    trainer = types.SimpleNamespace(
        model=model, accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x,
                                                       gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=list(weights or [1.0] * len(loss_types)), beta=h["beta"],
        label_smoothing=h["label_smoothing"], use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=h["discopop_tau"]),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones((2 * len(pc), T), dtype=torch.long),
              "attention_mask": torch.ones((2 * len(pc), T), dtype=torch.long),
              "completion_mask": torch.tensor(completion, dtype=torch.long),
              "ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


# Both sides compute in fp32 from the same fp32 inputs; they differ only in the order and
# implementation of a few elementwise ops (~1e-7 relative), so 1e-5 relative holds with room.
# atol 1e-7 only for losses that are exactly or nearly 0 on both sides (hinge's relu, apo's
# sigmoids near saturation, a saturated −log σ whose fp32 value is a denormal that XLA:CPU
# flushes to 0 and torch keeps), where a relative bound means nothing.
RTOL, ATOL = 1e-5, 1e-7


@pytest.mark.parametrize("name", TRL_DPO)
def test_matches_trl_live(name):
    arrays = _pairs()
    trl_loss, trl_metrics = _trl_dpo([name], arrays)
    ours = _ours(name, arrays)
    np.testing.assert_allclose(ours.mean(), trl_loss, rtol=RTOL, atol=ATOL)
    metrics = {k: float(np.mean(v)) for k, v in losses.preference_metrics(
        _lp(arrays), HYPER["beta"]).items()}
    for k in losses.METRIC_NAMES:
        np.testing.assert_allclose(metrics[k], trl_metrics[k], rtol=RTOL, atol=1e-6, err_msg=k)
    if name not in BATCH_LEVEL:  # pair by pair: trl on one pair at a time
        theirs = [_trl_dpo([name], tuple(x[i:i + 1] for x in arrays))[0] for i in range(len(ours))]
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name, hyper", [("robust", {"label_smoothing": 0.3}),
                                         ("exo_pair", {"label_smoothing": 1e-3}),
                                         ("aot", {"label_smoothing": 0.0}),
                                         ("aot_unpaired", {"label_smoothing": 0.0}),
                                         ("discopop", {"discopop_tau": 0.5, "beta": 0.1}),
                                         ("ipo", {"beta": 0.1}), ("sppo_hard", {"beta": 2.0})])
def test_matches_trl_live_at_other_hyperparameters(name, hyper):
    arrays = _pairs()
    trl_loss, _ = _trl_dpo([name], arrays, **hyper)
    np.testing.assert_allclose(_ours(name, arrays, **(HYPER | hyper)).mean(), trl_loss,
                               rtol=RTOL, atol=ATOL)


def test_weighted_list_is_the_weighted_sum_and_matches_trl_live():
    arrays = _pairs()
    names, weights = ("sigmoid", "sft", "bco_pair", "aot"), (0.8, 0.2, 1.0, 0.5)
    objective = DpoObjective(names, HYPER["beta"], HYPER["label_smoothing"], loss_weights=weights)
    combined = np.asarray(objective(_lp(arrays)), np.float64)
    np.testing.assert_allclose(combined, sum(w * _ours(n, arrays) for n, w in zip(names, weights)),
                               rtol=1e-6)
    trl_loss, _ = _trl_dpo(names, arrays, list(weights))
    np.testing.assert_allclose(combined.mean(), trl_loss, rtol=RTOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_live(label_smoothing):
    from trl.experimental.cpo import CPOTrainer
    arrays = _pairs()
    pc, pr, _, _, nc, nr = arrays
    trainer = types.SimpleNamespace(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                                    label_smoothing=label_smoothing,
                                    accelerator=types.SimpleNamespace(device="cpu"))
    theirs, _, _ = CPOTrainer.cpo_loss(trainer, torch.tensor(pc / nc), torch.tensor(pr / nr))
    ours = _ours("simpo", arrays, beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=RTOL, atol=ATOL)


def test_orpo_odds_ratio_matches_trl_live():
    """ORPO = sft (matched live above) + λ · odds ratio; trl's odds-ratio term is β·log σ(·),
    subtracted from its NLL, so ours is −1/λ times it per pair."""
    from trl.experimental.orpo import ORPOTrainer
    arrays = _pairs()
    pc, pr, _, _, nc, nr = arrays
    lam = HYPER["orpo_lambda"]
    trainer = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))
    theirs = ORPOTrainer.odds_ratio_loss(trainer, torch.tensor(pc / nc), torch.tensor(pr / nr))[0]
    odds = np.asarray(losses.odds_ratio(_lp(arrays)))
    np.testing.assert_allclose(-lam * odds, theirs.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_ours("orpo", arrays), _ours("sft", arrays) + lam * odds, rtol=1e-6)


# --- in the compiled step, and from a config -----------------------------------------------------

def test_config_loss_list_runs_a_compiled_dpo_step():
    """dpo.loss: [sigmoid, sft] with weights, through the config, a real jitted step: at step 0
    (policy = reference) the loss is log 2 + w · (chosen NLL per token), the NLL from the step's
    own logps/chosen metric (a mean over the 8 pairs) and the batch's chosen token count."""
    from test_train_steps import _dpo_batch, _run_dpo
    cfg = load_config(None, ("dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1.0, 0.5]"))
    objective = DpoObjective.from_section(cfg.dpo)
    assert objective.names == ("sigmoid", "sft") and objective.weights == (1.0, 0.5)
    batch = _dpo_batch()
    history, _ = _run_dpo((1, 1, 1), batch, steps=2, objective=objective)
    chosen_tokens = batch["chosen_loss_mask"].sum()  # replies of ≤ 7 tokens: all in the window 8
    nll = -8 * history[0]["logps/chosen"] / chosen_tokens
    np.testing.assert_allclose(history[0]["loss"], np.log(2) + 0.5 * nll, rtol=1e-5)
    assert history[0]["pairs"] == 8 and history[1]["loss"] < history[0]["loss"]


def test_reference_free_objective_runs_without_reference():
    """SimPO + ORPO: the step runs with ref_params=None (no reference forward), the eval gives
    the same loss with no reference as with an arbitrary one, and it equals the step's."""
    from test_train_steps import CFG, _dpo_batch, _setup
    from pdpo_jax.train import state as st
    from pdpo_jax.train.steps import make_dpo_step
    objective = DpoObjective(("simpo", "orpo"), beta=2.0, loss_weights=(1.0, 0.5))
    mesh, graphdef, tx, lr, state, state_sh = _setup(cfg=CFG)
    batch = _dpo_batch()
    evaluate = jax.jit(make_dpo_eval(graphdef, objective, window=8, chunk=4))
    nonsense = jax.tree.map(lambda x: x + 1.0, state.params)
    no_ref, _ = evaluate(state.params, None, batch)
    other_ref, _ = evaluate(state.params, nonsense, batch)
    assert float(no_ref["loss"]) == float(other_ref["loss"])
    step = st.jit_dpo_step(make_dpo_step(graphdef, tx, lr, objective, window=8, chunk=4),
                           state_sh, mesh, with_reference=False)
    _, metrics = step(state, st.shard_batch(micro(batch), mesh))
    np.testing.assert_allclose(metrics["loss"], float(no_ref["loss"]) / 8, rtol=1e-5)
    assert bool(metrics["finite"])


@pytest.mark.parametrize("overrides, message", [
    (("dpo.loss=sigmod",), r"dpo.loss: 'sigmod' is not one of .*; did you mean 'sigmoid'\?"),
    (("dpo.loss=[sigmoid, sfft]",),
     r"dpo.loss\[1\]: 'sfft' is not one of .*; did you mean 'sft'\?"),
    (("dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1.0]"),
     r"dpo.loss_weights: 1 weight\(s\) for 2 loss\(es\)"),
    (("dpo.loss=[]",), r"dpo.loss: an empty list"),
    (("dpo.loss_weights=[-1]",), r"dpo.loss_weights\[0\]: -1.0 is out of range"),
    (("dpo.simpo_gamma=-1",), r"dpo.simpo_gamma: -1.0 is out of range; allowed: \[0, inf\)"),
    (("dpo.discopop_tau=0",), r"dpo.discopop_tau: 0.0 is out of range; allowed: \(0, inf\)"),
    (("dpo.orpo_lambda=-0.1",), r"dpo.orpo_lambda: -0.1 is out of range"),
])
def test_bad_loss_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (("dpo.discopop_tau=0.1",), r"dpo.discopop_tau=0.1 has no effect on dpo.loss=\['sigmoid'\]"),
    (("dpo.loss=[sigmoid, sft]", "dpo.label_smoothing=0.1"),
     r"dpo.label_smoothing=0.1 has no effect"),
    (("dpo.loss=exo_pair",), r"dpo.loss='exo_pair' needs dpo.label_smoothing > 0"),
])
def test_unread_hyperparameter_is_a_config_error(overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        DpoObjective.from_section(cfg.dpo)
    # read by one loss of the list: fine
    DpoObjective.from_section(load_config(None, ("dpo.loss=[sigmoid, robust]",
                                                 "dpo.label_smoothing=0.1")).dpo)
