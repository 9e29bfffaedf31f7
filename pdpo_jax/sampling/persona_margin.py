"""The persona margin of a pseudo-negative: how much more the SFT model expects the rejected reply
under the swapped persona than under the original one (the paper's future work, without
annotated data):

    margin = log p(y⁻ | p_swapped, x) − log p(y⁻ | p, x)        (nats, summed over y⁻ + EOS)

A reply sampled under a swapped persona can ignore the persona (a generic "haha me too"); its
margin is ~0 and it teaches DPO nothing about persona consistency, while a reply that leans on
the swapped persona has a large margin. `negatives.filter: persona_margin` keeps pairs whose
margin exceeds `negatives.filter_margin`.

Both rows go through the training log-prob code (`logprobs.sequence_logps`: fp32 log-softmax,
the response positions only), jitted, in row-length buckets so a handful of shapes compile.
The reply is the text the DPO stage will train on, re-tokenized by the one prompt encoder.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.data.batches import bucket_length, round_up
from pdpo_jax.train.logprobs import sequence_logps

WINDOW_MULTIPLE = 16  # scored positions are padded to a multiple of this (fewer compiles)


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _sequence_logps(graphdef, params, batch, *, window: int):
    """Σ log p(response) per row [B], fp32."""
    logp_B, _ = sequence_logps(nnx.merge(graphdef, params), batch, window=window)
    return logp_B


class PersonaMarginScorer:
    """Scores rows {persona, swapped_persona, history, rejected} with one model.

    max_prompt_tokens: the prompt budget (the sampler's); truncate: data.truncation=truncate.
    batch_size: rows per call (rounded up to the mesh's batch divisor); buckets: row lengths.
    """

    def __init__(self, model, tokenizer, template: str, *, max_prompt_tokens: int,
                 truncate: bool, batch_size: int, buckets: Sequence[int], mesh=None):
        self.graphdef, self.params = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.tokenizer, self.template, self.mesh = tokenizer, template, mesh
        self.max_prompt_tokens, self.truncate = max_prompt_tokens, truncate
        self.batch_size = round_up(batch_size, shd.batch_divisor(mesh))
        self.buckets, self.pad = tuple(buckets), pdata.pad_id(tokenizer)

    def margins(self, rows: Sequence[dict]) -> np.ndarray:
        """float64 [N]: each row's margin in nats; NaN where a side does not encode."""
        encoded = [self._encode(r) for r in rows]
        flat = [(i, side, enc[side]) for i, enc in enumerate(encoded) if enc
                for side in (0, 1)]
        flat.sort(key=lambda f: f[2].length)  # similar lengths share a bucket
        logps = np.full((len(rows), 2), np.nan)
        for lo in range(0, len(flat), self.batch_size):
            group = flat[lo:lo + self.batch_size]
            for (i, side, _), value in zip(group, self._score([g[2] for g in group])):
                logps[i, side] = value
        return logps[:, 0] - logps[:, 1]

    def _encode(self, row: dict) -> tuple[pdata.Encoded, pdata.Encoded] | None:
        """(swapped-persona row, original-persona row), or None when either does not fit."""
        try:
            return tuple(pdata.encode_pair(self.tokenizer, self.template, persona,
                                           row["history"], row["rejected"],
                                           max_prompt_tokens=self.max_prompt_tokens,
                                           truncate=self.truncate)
                         for persona in (row["swapped_persona"], row["persona"]))
        except pdata.DoesNotFit:
            return None

    def _score(self, group: list[pdata.Encoded]) -> np.ndarray:
        longest = max(e.length for e in group)
        T = (bucket_length(longest, self.buckets) if longest <= max(self.buckets)
             else round_up(longest, 64))
        window = round_up(max(len(e.response_ids) for e in group), WINDOW_MULTIPLE)
        padded = list(group) + [None] * (self.batch_size - len(group))
        batch = {k: v for k, v in pdata.sft_batch(padded, T, self.pad).items() if k != "index"}
        if self.mesh is not None:
            batch = {k: jax.device_put(v, shd.row_sharding(self.mesh, v.ndim))
                     for k, v in batch.items()}
        out = np.asarray(jax.device_get(_sequence_logps(self.graphdef, self.params, batch,
                                                        window=min(window, T))), np.float64)
        return out[:len(group)]


def margin_summary(margins: Sequence[float], threshold: float) -> dict:
    """Mean and quantiles of the scored margins, how many exceed `threshold`, how many could
    not be scored."""
    values = np.asarray([m for m in margins if not math.isnan(m)], np.float64)
    out = {"threshold": threshold, "scored": int(values.size),
           "unscored": len(margins) - int(values.size),
           "above_threshold": int((values > threshold).sum())}
    if values.size:
        qs = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9])
        out |= {"mean": float(values.mean()),
                **{k: float(q) for k, q in zip(("q10", "q25", "median", "q75", "q90"), qs)}}
    return out
