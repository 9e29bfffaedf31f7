"""From logits to tokens: temperature, top-k, top-p by rejection and the draw itself, in fp32.

Tie rule, everywhere: when a filter must choose between tokens of equal probability, the lower
token id wins (as `jnp.argmax` and `lax.top_k` do), so every filter keeps a deterministic set.
This differs from Hugging Face, which keeps every token tied with the k-th logit in top-k and
leaves top-p ties to an unstable sort.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Non-negative fp32 bit patterns are ordered like the floats, so a bisection over int32 bit
# patterns in [0, bits(1.0)] (< 2**30) pins the exact threshold in 30 halvings; 31 for margin.
_BISECT_STEPS = 31
_CDF_BLOCK = 128  # tokens per block of the two-level inverse CDF (`inverse_cdf`)
_NUCLEUS_ATTEMPTS = 8  # rejection draws before `draw_from_nucleus` builds the nucleus


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
    """bool [B, V]: the smallest set of tokens whose probability mass is >= top_p (a number, or
    one per row [B]).

    Equals "sort by probability (ties: lower id first), keep each token whose preceding mass
    is < top_p". Tokens above the threshold are all kept; tokens tied at it are taken in id
    order until the mass reaches top_p. Sums are fp32, so a top_p within ~1e-7 of a prefix
    mass may resolve either way (as it does for a sort-and-cumsum implementation).
    """
    t_B1 = nucleus_threshold(probs_BV, top_p)[:, None]
    top_p = _per_row(top_p)
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


def _per_row(x):
    """A per-row setting [B] as a column [B, 1] beside [B, V] arrays; a Python number as it is."""
    return x[:, None] if getattr(x, "ndim", 0) == 1 else x


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
    nucleus of the (top-k renormalised) softmax (`draw_from_nucleus`, which never builds the
    nucleus mask unless it must).
    """
    if greedy:
        return argmax_first(logits_BV)
    probs_BV = jax.nn.softmax(_scaled_top_k(logits_BV, temperature, top_k), axis=-1)
    if top_p < 1.0:
        return draw_from_nucleus(keys_B, probs_BV, top_p)
    return draw_from(keys_B, probs_BV)


def draw_from(keys_B: jax.Array, weights_BV: jax.Array) -> jax.Array:
    """int32 [B]: token i with probability weights[i] / Σ weights, by inverse CDF: one uniform
    per row (its own key: a row's token never depends on its neighbours), ~3x cheaper per decode
    step on XLA:CPU than Gumbel-max, which draws V random numbers per row. See `inverse_cdf`."""
    return inverse_cdf(weights_BV)(_uniforms(keys_B))


def inverse_cdf(weights_BV: jax.Array, block: int = _CDF_BLOCK):
    """`draw(u_B) -> int32 [B]`: for u in [0, 1), the first token of weight > 0 whose running
    sum of the weights exceeds u·Σ, i.e. token i with probability weights[i] / Σ (each row needs
    a weight > 0). Exact up to fp32 rounding of the running sum.

    In two levels, because XLA:CPU lowers a running sum over the whole vocab to a log-depth scan
    of ~log2(V) full-width passes: the sums of blocks of `block` tokens and their running sum
    are made once (one pass over the weights); a draw then finds its block by that running sum
    and its token by a running sum inside the one block, continued from the blocks before it.
    Zero-weight tokens are never drawn (asked for explicitly: the running sum is not guaranteed
    monotone to the last bit across a run of zeros); if fp32 rounding leaves the block's running
    sum just short of the target, its last token of weight > 0 is drawn.
    """
    B, V = weights_BV.shape
    nb = -(-V // block)
    w_BNK = jnp.pad(weights_BV, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    block_BN = jnp.sum(w_BNK, axis=-1)
    cdf_BN = _running_sum(block_BN)
    total_B = cdf_BN[:, -1]
    index_K = jnp.arange(block, dtype=jnp.int32)

    def draw(u_B):
        # u·Σ can round up to Σ: keep it below, so some block's running sum always exceeds it.
        target_B1 = jnp.minimum(u_B * total_B, jnp.nextafter(total_B, 0.0))[:, None]
        n_B = _first_true((cdf_BN > target_B1) & (block_BN > 0))
        previous_B1 = jnp.take_along_axis(cdf_BN, jnp.maximum(n_B - 1, 0)[:, None], axis=1)
        before_B1 = jnp.where(n_B[:, None] > 0, previous_B1, 0.0)
        w_BK = jnp.take_along_axis(w_BNK, n_B[:, None, None], axis=1)[:, 0]
        hit_BK = (before_B1 + _running_sum(w_BK) > target_B1) & (w_BK > 0)
        last_B = jnp.max(jnp.where(w_BK > 0, index_K, 0), axis=-1)
        k_B = jnp.where(jnp.any(hit_BK, axis=-1), _first_true(hit_BK), last_B)
        return jnp.minimum(n_B * block + k_B, V - 1)

    return draw


def _running_sum(x_BN: jax.Array) -> jax.Array:
    """Running sum along the last axis as one matmul with a triangle of ones (exact products,
    fp32 sums): XLA:CPU's cumsum is a log-depth scan of ~20 tiny ops, a cost at every draw."""
    n = x_BN.shape[-1]
    upper_NN = jnp.triu(jnp.ones((n, n), x_BN.dtype))
    return jnp.matmul(x_BN, upper_NN, precision=jax.lax.Precision.HIGHEST)


def in_nucleus(probs_BV: jax.Array, token_B: jax.Array, top_p) -> jax.Array:
    """bool [B]: `top_p_mask` keeps the row's token, i.e. the mass of the tokens before it in
    the order (probability descending, lower id first on ties) is < top_p. One pass over V."""
    p_B1 = jnp.take_along_axis(probs_BV, token_B[:, None], axis=1)
    index_1V = jnp.arange(probs_BV.shape[-1], dtype=jnp.int32)[None]
    before_BV = (probs_BV > p_B1) | ((probs_BV == p_B1) & (index_1V < token_B[:, None]))
    return jnp.sum(jnp.where(before_BV, probs_BV, 0.0), axis=-1) < top_p


def draw_from_nucleus(keys_B: jax.Array, probs_BV: jax.Array, top_p,
                      attempts: int = _NUCLEUS_ATTEMPTS) -> jax.Array:
    """int32 [B]: a draw from the top-p nucleus (`top_p_mask`), renormalised, without building it.

    Rejection: draw from the whole distribution and keep the token if it is `in_nucleus`, else
    draw again with the row's next uniform (all `attempts` + 1 of them come from the row's key
    in one generator call). An accepted token follows the distribution restricted
    to the nucleus exactly, and each draw is accepted with probability the nucleus mass (>=
    top_p), so a row needs 1/top_p draws on average, each one pass over the vocab; the nucleus
    threshold needs ~31 (`nucleus_threshold`). Rows still rejected after `attempts` draws (for
    top_p = 0.9 a chance below 1e-8) take one draw from the nucleus itself. A row's token
    depends only on its own key, never on its neighbours'.
    """
    draw = inverse_cdf(probs_BV)
    u_BA = _uniforms(keys_B, attempts + 1)  # one per draw, and one for the fallback

    def attempt(a):
        token_B = draw(jax.lax.dynamic_index_in_dim(u_BA, a, axis=1, keepdims=False))
        return token_B, in_nucleus(probs_BV, token_B, top_p)

    def again(carry):
        a, token_B, pending_B = carry
        new_B, ok_B = attempt(a)
        return a + 1, jnp.where(pending_B & ok_B, new_B, token_B), pending_B & ~ok_B

    token_B, ok_B = attempt(0)
    _, token_B, pending_B = jax.lax.while_loop(
        lambda carry: (carry[0] < attempts) & jnp.any(carry[2]), again,
        (jnp.asarray(1, jnp.int32), token_B, ~ok_B))

    def from_nucleus():
        nucleus_BV = jnp.where(top_p_mask(probs_BV, top_p), probs_BV, 0.0)
        return jnp.where(pending_B, inverse_cdf(nucleus_BV)(u_BA[:, attempts]), token_B)

    return jax.lax.cond(jnp.any(pending_B), from_nucleus, lambda: token_B)


def _uniforms(keys_B: jax.Array, n: int | None = None) -> jax.Array:
    """fp32 in [0, 1) from each row's key: [B], or [B, n] drawn at once (one generator call)."""
    return jax.vmap(lambda key: jax.random.uniform(key, () if n is None else (n,), jnp.float32))(keys_B)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling settings per row [B]: in the engine each row may serve another request.
    top_k_B 0 and top_p_B 1 switch a filter off; temperature_B is ignored where greedy_B."""
    greedy_B: jax.Array
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array


def sample_rows(keys_B: jax.Array, logits_BV: jax.Array, rows: RowSampling, *,
                max_top_k: int) -> jax.Array:
    """int32 [B]: `sample_tokens` with each row's own settings. A row's token is exactly the one
    `sample_tokens` draws for that row's settings and key (the same filters and draws), so
    rows of different requests share one compiled step. max_top_k: static bound on top_k_B
    (0: no row uses top-k). A batch of greedy rows skips the sampling work."""
    greedy_B = argmax_first(logits_BV)

    def sampled():
        temperature_B = jnp.where(rows.greedy_B, 1.0, rows.temperature_B).astype(jnp.float32)
        logits = logits_BV.astype(jnp.float32) / temperature_B[:, None]
        if max_top_k > 0:
            logits = jnp.where(_top_k_rows(logits, rows.top_k_B, max_top_k), logits, -jnp.inf)
        probs_BV = jax.nn.softmax(logits, axis=-1)
        plain_B = draw_from(keys_B, probs_BV)
        nucleus_B_ = rows.top_p_B < 1.0
        token_B = jax.lax.cond(jnp.any(nucleus_B_ & ~rows.greedy_B),
                               lambda: draw_from_nucleus(keys_B, probs_BV, rows.top_p_B),
                               lambda: plain_B)
        return jnp.where(rows.greedy_B, greedy_B, jnp.where(nucleus_B_, token_B, plain_B))

    return jax.lax.cond(jnp.all(rows.greedy_B), lambda: greedy_B, sampled)


def _top_k_rows(logits_BV: jax.Array, top_k_B: jax.Array, max_top_k: int) -> jax.Array:
    """bool [B, V]: each row's top_k_B largest logits (ties: lower id first, as `top_k_mask`);
    rows with top_k_B 0 (off) or >= V keep every token."""
    V = logits_BV.shape[-1]
    k = min(max_top_k, V)
    _, index_BK = jax.lax.top_k(logits_BV, k)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BK = jnp.arange(k)[None, :] < top_k_B[:, None]
    mask_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, index_BK].set(keep_BK)
    return mask_BV | ((top_k_B <= 0) | (top_k_B >= V))[:, None]
