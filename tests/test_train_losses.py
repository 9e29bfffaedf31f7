"""Losses and log-probs against independent references: numpy formulas and HF PyTorch logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from batches import sft_rows
from hf_reference import tiny_hf_model
from pdpo_jax.models import from_pretrained
from pdpo_jax.train import losses
from pdpo_jax.train.logprobs import sequence_logps, token_logps


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 10, 16) for _ in range(4))
    nc, nr = rng.integers(1, 30, 16), rng.integers(1, 30, 16)
    lp = losses.PairLogps(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr, nc, nr)))
    return lp, (pc, pr, rc, rr, nc, nr)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_and_cdpo_match_numpy(pair, beta):
    lp, (pc, pr, rc, rr, _, _) = pair
    z = beta * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(losses.sigmoid_dpo(lp, beta), -_np_log_sigmoid(z), rtol=1e-5)
    eps = 0.1
    expected = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
    np.testing.assert_allclose(losses.conservative_dpo(lp, beta, label_smoothing=eps), expected, rtol=1e-5)


def test_ipo_and_rpo_match_numpy(pair):
    lp, (pc, pr, rc, rr, nc, nr) = pair
    beta = 0.5
    delta = (pc - rc) / nc - (pr - rr) / nr
    np.testing.assert_allclose(losses.ipo(lp, beta), (delta - 1 / (2 * beta)) ** 2, rtol=1e-4)
    np.testing.assert_allclose(losses.rpo_nll(lp), -pc / nc, rtol=1e-5)


def test_metrics_match_trl_definitions(pair):
    lp, (pc, pr, rc, rr, _, _) = pair
    m = losses.preference_metrics(lp, 0.5)
    np.testing.assert_allclose(m["rewards/chosen"], 0.5 * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], 0.5 * ((pc - rc) - (pr - rr)), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(m["rewards/accuracies"], (pc - rc > pr - rr).astype(np.float32))


def test_ref_equals_policy_gives_log2(pair):
    lp, _ = pair
    same = losses.PairLogps(lp.policy_chosen, lp.policy_rejected, lp.policy_chosen,
                            lp.policy_rejected, lp.chosen_len, lp.rejected_len)
    np.testing.assert_allclose(losses.sigmoid_dpo(same, 0.5), np.log(2.0), rtol=1e-7)
    np.testing.assert_array_equal(losses.preference_metrics(same, 0.5)["rewards/margins"], 0.0)


def test_token_logps_chunking_matches_full_log_softmax():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(3, 37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (3, 37)))
    full = np.take_along_axis(np.asarray(jnp.einsum("btd,vd->btv", h, w)), np.asarray(y)[..., None], -1)[..., 0]
    full = full - np.log(np.exp(np.asarray(jnp.einsum("btd,vd->btv", h, w))).sum(-1))
    for chunk in (1, 8, 37, 64):
        np.testing.assert_allclose(token_logps(h, w, y, chunk), full, rtol=1e-5, atol=1e-4)


def test_token_logps_gradients_equal_autodiff_of_log_softmax():
    """The chunks' hand-written backward ((onehot − softmax)·g through the LM head) against
    autodiff of the unchunked formula, for h and the unembedding, with a chunk that does
    not divide R (padded positions must add nothing) and repeated targets."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(3, 37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 7, (3, 37)))  # 7 of 50 ids: each row of W gets several
    g = jnp.asarray(rng.normal(size=(3, 37)), jnp.float32)

    def reference(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w), axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, y[..., None], -1)[..., 0] * g)

    want = jax.grad(reference, argnums=(0, 1))(h, w)
    for chunk in (8, 37):
        got = jax.jit(jax.grad(lambda h, w: jnp.sum(token_logps(h, w, y, chunk) * g),
                               argnums=(0, 1)))(h, w)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_sequence_logps_match_hf_and_ignore_padding(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    specs = [(7, 5), (3, 9), (10, 1)]
    batch = sft_rows(rng, 97, specs, T=16)
    with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(batch["tokens"]).long(),
                    attention_mask=torch.as_tensor(batch["attention_mask"]).long()).logits
    logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(
        -1, torch.as_tensor(batch["tokens"][:, 1:]).long()[..., None])[..., 0].numpy()
    expected = (logp * batch["loss_mask"][:, 1:]).sum(1)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    for window in (None, 9, 12):
        got, n = sequence_logps(model, jb, window=window, chunk=4)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(n, [5, 9, 1])
    # The same rows left-padded, or unpadded one at a time, give the same sums.
    for b, (p, r) in enumerate(specs):
        n_real = p + r
        for pad_left in (0, 16 - n_real):
            row = {k: np.zeros((1, 16), v.dtype) for k, v in batch.items()}
            for k, v in batch.items():
                row[k][0, pad_left:pad_left + n_real] = v[b, :n_real]
            row["positions"][0, pad_left:pad_left + n_real] = np.arange(n_real)
            got, _ = sequence_logps(model, {k: jnp.asarray(v) for k, v in row.items()}, window=10)
            np.testing.assert_allclose(got[0], expected[b], rtol=0, atol=1e-4)
