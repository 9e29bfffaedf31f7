"""From logits to tokens: temperature, top-k, sort-free top-p and the draw itself, in fp32.

Tie rule, everywhere: when a filter must choose between tokens of equal probability, the lower
token id wins (as `jnp.argmax` and `lax.top_k` do), so every filter keeps a deterministic set.
This differs from Hugging Face, which keeps every token tied with the k-th logit in top-k and
leaves top-p ties to an unstable sort.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Non-negative fp32 bit patterns are ordered like the floats, so a bisection over int32 bit
# patterns in [0, bits(1.0)] (< 2**30) pins the exact threshold in 30 halvings; 31 for margin.
_BISECT_STEPS = 31


def top_k_mask(logits_BV: jax.Array, k: int) -> jax.Array:
    """bool [B, V]: exactly the k largest logits of each row (ties: lower token id first)."""
    _, index_BK = jax.lax.top_k(logits_BV, k)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.zeros(logits_BV.shape, bool).at[rows_B1, index_BK].set(True)


def nucleus_threshold(probs_BV: jax.Array, top_p) -> jax.Array:
    """fp32 [B]: the largest t such that the mass of {p >= t} is >= top_p.

    The mass of {p >= t} only changes at probability values, so t is one of them: the
    probability of the last token of the nucleus. Bisection on the bit pattern of t needs only
    masked sums over the vocab, no sort (argsort is ~20x slower here on XLA:CPU).
    """
    bits_BV = jax.lax.bitcast_convert_type(probs_BV, jnp.int32)

    def halve(_, bounds):
        lo_B, hi_B = bounds  # invariant: mass(p >= lo) >= top_p > mass(p >= hi)
        mid_B = lo_B + (hi_B - lo_B) // 2
        mass_B = jnp.sum(jnp.where(bits_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1)
        enough_B = mass_B >= top_p
        return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B)

    lo_B = jnp.zeros(probs_BV.shape[:1], jnp.int32)
    hi_B = jnp.max(bits_BV, axis=-1) + 1
    lo_B, _ = jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lo_B, hi_B))
    return jax.lax.bitcast_convert_type(lo_B, jnp.float32)


def top_p_mask(probs_BV: jax.Array, top_p) -> jax.Array:
    """bool [B, V]: the smallest set of tokens whose probability mass is >= top_p.

    Equals "sort by probability (ties: lower id first), keep each token whose preceding mass
    is < top_p". Tokens above the threshold are all kept; tokens tied at it are taken in id
    order until the mass reaches top_p. Sums are fp32, so a top_p within ~1e-7 of a prefix
    mass may resolve either way (as it does for a sort-and-cumsum implementation).
    """
    t_B1 = nucleus_threshold(probs_BV, top_p)[:, None]
    above_BV = probs_BV > t_B1
    mass_above_B1 = jnp.sum(jnp.where(above_BV, probs_BV, 0.0), axis=-1, keepdims=True)
    tied_BV = probs_BV == t_B1

    def tie_ranks():  # rank of each tied token among the tied ones, in id order
        return jnp.cumsum(tied_BV, axis=-1, dtype=jnp.int32) - tied_BV

    # Exact ties at the threshold are rare with real logits; skip the O(V) cumsum without them.
    several_tied = jnp.any(jnp.sum(tied_BV, axis=-1) > 1)
    rank_BV = jax.lax.cond(several_tied, tie_ranks, lambda: jnp.zeros(probs_BV.shape, jnp.int32))
    needed_BV = (rank_BV == 0) | (mass_above_B1 + rank_BV * t_B1 < top_p)
    return above_BV | (tied_BV & needed_BV)


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """fp32 [B, V]: logits / temperature, then top-k, then top-p (HF's order); dropped → -inf.

    top_k=0 and top_p=1 switch a filter off. All three are Python numbers: the filters are
    part of the compiled program, not traced values.
    """
    logits_BV = _scaled_top_k(logits_BV, temperature, top_k)
    if top_p < 1.0:
        keep_BV = top_p_mask(jax.nn.softmax(logits_BV, axis=-1), top_p)
        logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return logits_BV


def _scaled_top_k(logits_BV, temperature: float, top_k: int):
    """fp32 logits / temperature, the ones outside the top k (0: off) set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / jnp.float32(temperature)
    if 0 < top_k < logits_BV.shape[-1]:
        logits_BV = jnp.where(top_k_mask(logits_BV, top_k), logits_BV, -jnp.inf)
    return logits_BV


def _first_true(mask_BV: jax.Array) -> jax.Array:
    """int32 [B]: the lowest index where the row is True (the last index for an all-False row).

    A masked min over indices: a plain reduction, ~3x faster on XLA:CPU than argmax's variadic
    (value, index) reduce, which is on the path of every decode step."""
    index_1V = jnp.arange(mask_BV.shape[-1], dtype=jnp.int32)[None]
    first_B = jnp.min(jnp.where(mask_BV, index_1V, mask_BV.shape[-1]), axis=-1)
    return jnp.minimum(first_B, mask_BV.shape[-1] - 1)


def argmax_first(x_BV: jax.Array) -> jax.Array:
    """int32 [B]: index of the row maximum, the lowest on ties (= jnp.argmax, without NaNs;
    a NaN row gives the last index): a max and `_first_true`."""
    return _first_true(x_BV == jnp.max(x_BV, axis=-1, keepdims=True))


def sample_tokens(keys_B: jax.Array, logits_BV: jax.Array, *, greedy: bool, temperature: float,
                  top_k: int, top_p: float) -> jax.Array:
    """int32 [B]: argmax, or one draw per row from the filtered softmax with that row's key.

    Same distribution as `filter_logits` then softmax: logits / temperature, top-k, then the
    nucleus of the (top-k renormalised) softmax; the kept probabilities are drawn from by
    `draw_from`, without renormalising again.
    """
    if greedy:
        return argmax_first(logits_BV)
    probs_BV = jax.nn.softmax(_scaled_top_k(logits_BV, temperature, top_k), axis=-1)
    if top_p < 1.0:
        probs_BV = jnp.where(top_p_mask(probs_BV, top_p), probs_BV, 0.0)
    return draw_from(keys_B, probs_BV)


def draw_from(keys_B: jax.Array, weights_BV: jax.Array) -> jax.Array:
    """int32 [B]: token i with probability weights[i] / Σ weights, by inverse CDF.

    One uniform per row (its own key: a row's token never depends on its neighbours) against
    the running sum of the weights: the first token of weight > 0 whose cumulative weight
    exceeds u·Σ. Exact up to fp32 rounding of the running sum, and ~3x cheaper per decode step
    on XLA:CPU than Gumbel-max, which draws V random numbers per row. Zero-weight tokens are
    never drawn (asked for explicitly: XLA sums the prefix in blocks, so the running sum is not
    guaranteed monotone to the last bit across a run of zeros).
    """
    cumulative_BV = jnp.cumsum(weights_BV, axis=-1)
    total_B = cumulative_BV[:, -1]
    u_B = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys_B)
    # u·Σ can round up to Σ: keep it below, so some token's running sum always exceeds it.
    target_B1 = jnp.minimum(u_B * total_B, jnp.nextafter(total_B, 0.0))[:, None]
    return _first_true((cumulative_BV > target_B1) & (weights_BV > 0))
