"""Per-token and per-sequence log-probabilities of response tokens, without a B×T×V fp32 tensor.

One code path for the SFT loss, both DPO forwards and Dialogue-NLI scoring:
  1. run the model to final hidden states h_BTD (no logits);
  2. keep only the positions that predict a response token (`response_window`), so the
     prompt never goes through the LM head;
  3. log p(y) = logits[y] − logsumexp(logits), logits = h·Wᵀ in fp32, chunked over time so at
     most [B, chunk, V] logits exist at once, forward or backward: each chunk's backward
     rebuilds its logits and forms (onehot(y) − softmax)·g in place, so W's gradient is one
     [V, D] accumulator. (Autodiff of h·W[y] − logsumexp added a [V, D] scatter of W[y]'s
     gradient and a third [V, D] buffer for the sum: 108 MiB more at SmolLM2-135M's SFT
     step peak, `bench/memory_probe.py`.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pdpo_jax.models.attention import segment_id
from pdpo_jax.models.ops import unembed

LOGIT_CHUNK = 128  # time steps of fp32 logits built at once (the default `chunk`)


def response_window(loss_mask_BT, window: int):
    """Indices of the `window` positions whose next token starts the response.

    Rows are [prompt | response | pad] (right-padded, response contiguous). Returns
    (pred_idx_BR, target_idx_BR, valid_BR): position t = pred_idx predicts token t+1.
    """
    B, T = loss_mask_BT.shape
    start_B = jnp.argmax(loss_mask_BT, axis=1)  # first response token
    target_BR = start_B[:, None] + jnp.arange(window)[None, :]
    valid_BR = jnp.take_along_axis(loss_mask_BT, jnp.clip(target_BR, 0, T - 1), axis=1)
    valid_BR = valid_BR & (target_BR < T)
    target_BR = jnp.clip(target_BR, 1, T - 1)
    return target_BR - 1, target_BR, valid_BR


def token_logps(h_BRD, unembed_VD, targets_BR, chunk: int = LOGIT_CHUNK):
    """fp32 log p(targets) [B, R] from hidden states, `chunk` time steps of logits at a time."""
    B, R, D = h_BRD.shape
    chunk = min(chunk, R)
    pad = (-R) % chunk
    if pad:
        h_BRD = jnp.pad(h_BRD, ((0, 0), (0, pad), (0, 0)))
        targets_BR = jnp.pad(targets_BR, ((0, 0), (0, pad)))
    n = h_BRD.shape[1] // chunk
    w = unembed_VD.astype(h_BRD.dtype)
    h_nBCD = h_BRD.reshape(B, n, chunk, D).swapaxes(0, 1)
    y_nBC = targets_BR.reshape(B, n, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: _chunk_logps(xs[0], w, xs[1]), (h_nBCD, y_nBC))
    return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :R]


@jax.custom_vjp
def _chunk_logps(h_BCD, w_VD, y_BC):
    """log softmax(h·Wᵀ)[y] [B, C] in fp32; the backward keeps h, W and y only."""
    logits = unembed(h_BCD, w_VD)
    target = jnp.take_along_axis(logits, y_BC[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1)


def _chunk_logps_fwd(h_BCD, w_VD, y_BC):
    return _chunk_logps(h_BCD, w_VD, y_BC), (h_BCD, w_VD, y_BC)


def _chunk_logps_bwd(saved, g_BC):
    h_BCD, w_VD, y_BC = saved
    logits, unembed_vjp = jax.vjp(unembed, h_BCD, w_VD)
    onehot = jax.nn.one_hot(y_BC, logits.shape[-1], dtype=logits.dtype)
    d_logits = g_BC[..., None] * (onehot - jax.nn.softmax(logits, axis=-1))
    d_h, d_w = unembed_vjp(d_logits)
    return d_h, d_w, None


_chunk_logps.defvjp(_chunk_logps_fwd, _chunk_logps_bwd)


def response_logps(model, tokens_BT, positions_BT, attention_mask_BT, loss_mask_BT, *,
                   window: int | None = None, chunk: int = LOGIT_CHUNK):
    """Per-token log-probs of the response tokens and their mask, both [B, R].

    window: static number of response positions to score (≥ the longest response in the
    batch); None scores every position (R = T - 1).
    """
    if window is None:  # T - 1 of T columns: no saving in selecting them inside the model
        h_BTD, _ = model.hidden_states(tokens_BT, positions_BT, attention_mask_BT)
        h_BRD, y_BR, valid = h_BTD[:, :-1], tokens_BT[:, 1:], loss_mask_BT[:, 1:].astype(bool)
    else:
        pred, targets, valid = response_window(loss_mask_BT, window)
        h_BRD, _ = model.hidden_states(tokens_BT, positions_BT, attention_mask_BT, select_BQ=pred)
        y_BR = jnp.take_along_axis(tokens_BT, targets, axis=1)
    logp = token_logps(h_BRD, model.unembedding_VD(), y_BR, chunk)
    return jnp.where(valid, logp, 0.0), valid


def sequence_logps(model, batch: dict, prefix: str = "", **kw):
    """Sum of response-token log-probs per row [B] and the response lengths [B]."""
    logp, valid = response_logps(model, batch[prefix + "tokens"], batch[prefix + "positions"],
                                 batch[prefix + "attention_mask"], batch[prefix + "loss_mask"], **kw)
    return logp.sum(axis=1), valid.sum(axis=1)


def shared_prompt_rows(chosen: dict, rejected: dict, window: int):
    """Packs each pair into one row [prompt | chosen | rejected | pad] of T + window columns.

    chosen, rejected: the SFT layout ([prompt | response | pad], right-padded, T columns) of
    the two sides of each pair, over the same prompt. Segments (`segment_id`): 0 padding, then
    group 1: the prompt (part 0), chosen (1), rejected (2); the rejected reply's positions
    continue from the prompt's end, so each reply sees exactly what it sees in its own row. Returns (tokens, positions,
    segments) [B, T + window] and (pred, target, valid) [B, 2 * window], the chosen reply's
    `window` positions then the rejected one's: column pred predicts the token at column
    target (the rejected reply's first token is predicted from the prompt's last column).
    """
    T = chosen["tokens"].shape[1]
    prompt_B1 = jnp.argmax(chosen["loss_mask"], axis=1)[:, None]  # first response column
    n_chosen_B1 = jnp.sum(chosen["loss_mask"], axis=1, dtype=jnp.int32)[:, None]
    n_rejected_B1 = jnp.sum(rejected["loss_mask"], axis=1, dtype=jnp.int32)[:, None]
    rejected_start_B1 = prompt_B1 + n_chosen_B1
    col = jnp.arange(T + window)[None, :]
    from_chosen = col < rejected_start_B1  # prompt + chosen sit as in the chosen row (P + C <= T)
    in_rejected = ~from_chosen & (col < rejected_start_B1 + n_rejected_B1)
    from_rejected = jnp.clip(col - n_chosen_B1, 0, T - 1)  # same prompt, so same offset

    def pick(name):
        c = jnp.pad(chosen[name], ((0, 0), (0, window)))
        r = jnp.take_along_axis(rejected[name], from_rejected, axis=1)
        return jnp.where(from_chosen, c, jnp.where(in_rejected, r, 0))

    segments = jnp.select([col < prompt_B1, from_chosen, in_rejected],
                          [segment_id(1, 0), segment_id(1, 1), segment_id(1, 2)],
                          0).astype(jnp.int32)
    step = jnp.arange(window)[None, :]
    target = jnp.concatenate([prompt_B1 + step, rejected_start_B1 + step], axis=1)
    pred = jnp.concatenate([prompt_B1 + step - 1,
                            jnp.where(step == 0, prompt_B1 - 1, rejected_start_B1 + step - 1)],
                           axis=1)
    valid = jnp.concatenate([step < n_chosen_B1, step < n_rejected_B1], axis=1)
    last = T + window - 1
    return (pick("tokens"), pick("positions"), segments,
            (jnp.clip(pred, 0, last), jnp.clip(target, 0, last), valid))


def shared_prompt_logps(model, chosen: dict, rejected: dict, *, window: int,
                        chunk: int = LOGIT_CHUNK):
    """Per-token response log-probs and masks of each side, (logp, valid) [B, window] for chosen
    then for rejected, from one forward over rows that hold each prompt once
    (`shared_prompt_rows`): P + 2R tokens per pair instead of 2(P + R). Equal to
    `response_logps` over the chosen and rejected rows, up to fp32 summation order.

    Every gather stays inside a pair's row: the two sides' positions are scored as one
    [B, 2 * window] block, so a batch-sharded step moves no rows between devices (concatenating
    the sides on the batch axis did, and XLA:CPU's collectives then hung intermittently on
    8 host devices)."""
    tokens, positions, segments, (pred, target, valid) = shared_prompt_rows(chosen, rejected, window)
    logp = packed_logps(model, tokens, positions, segments, pred, target, valid, chunk=chunk)
    return (logp[:, :window], valid[:, :window]), (logp[:, window:], valid[:, window:])


def packed_logps(model, tokens_BT, positions_BT, segments_BT, pred_BQ, target_BQ, valid_BQ, *,
                 chunk: int = LOGIT_CHUNK, cache=None):
    """fp32 log p(token at target | everything its segment sees) [B, Q], 0 where not valid, for
    rows packed with segments (`models.attention.key_info`): column pred_BQ predicts the token
    at column target_BQ. One forward serves every sequence of a row — a shared prompt and its
    continuations (DPO's chosen and rejected, Dialogue-NLI's candidates), or independent records
    packed side by side; the last layer runs at the Q predicting columns alone. cache: a KV
    cache whose slots every segment sees as its prefix (`attention.CACHED_PREFIX`), or None."""
    h_BQD, _ = model.hidden_states(tokens_BT, positions_BT, segments_BT > 0, cache,
                                   segments_BT=segments_BT, select_BQ=pred_BQ)
    y_BQ = jnp.take_along_axis(tokens_BT, target_BQ, axis=1)
    return jnp.where(valid_BQ, token_logps(h_BQD, model.unembedding_VD(), y_BQ, chunk), 0.0)


def owner_sums(logp_RQ, valid_RQ, owner_RQ, side_RQ, owners: int):
    """Σ log-prob and token count of each (owner, side) of packed rows: fp32 [owners, 2] and
    int32 [owners, 2] (a DPO pair's chosen and rejected; an owner with no tokens sums to 0)."""
    bins = jnp.where(valid_RQ, owner_RQ * 2 + side_RQ, 2 * owners).ravel()  # padding: a spare bin
    sums = jax.ops.segment_sum(jnp.where(valid_RQ, logp_RQ, 0.0).ravel(), bins, 2 * owners + 1)
    counts = jax.ops.segment_sum(valid_RQ.astype(jnp.int32).ravel(), bins, 2 * owners + 1)
    return sums[:-1].reshape(owners, 2), counts[:-1].reshape(owners, 2)
