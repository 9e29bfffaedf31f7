"""`softmax_attention` (training and scoring without a cache) against the function it stands in
for, jax.nn.dot_product_attention's XLA path: outputs and gradients, fp32 and bf16, grouped
queries, packed-row masks and a query row that sees no key at all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdpo_jax.models.attention import softmax_attention

B, T, N, K, H = 3, 11, 6, 2, 8


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), dtype) for n in (N, K, K))
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[0, 6:, :6] = False  # two records packed in one row: the second sees only itself
    mask[1, 3] = False  # a query row with no key (padding): uniform probabilities, no gradient
    mask[2, :, 5:] = False
    weights = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    return q, k, v, jnp.asarray(mask), weights


def _reference(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def _outputs_and_grads(attention, q, k, v, mask, weights):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, mask).astype(jnp.float32) * weights)
    out = jax.jit(attention)(q, k, v, mask)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2 ** -7)])
def test_equals_dot_product_attention_and_its_gradients(dtype, tol):
    """fp32: equal up to summation order. bf16: q, k, v and the gradients are bf16, so each
    entry may differ by a rounding step of bf16 (2^-8 relative), relative to the largest."""
    q, k, v, mask, weights = _inputs(dtype)
    out, grads = _outputs_and_grads(softmax_attention, q, k, v, mask, weights)
    want_out, want_grads = _outputs_and_grads(_reference, q, k, v, mask, weights)
    assert out.dtype == want_out.dtype == dtype
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(want).max() > 0.5  # something to compare
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    # the query row that sees nothing moves no key or value, as in the reference
    assert np.all(np.asarray(grads[0], np.float32)[1, 3] == 0)
