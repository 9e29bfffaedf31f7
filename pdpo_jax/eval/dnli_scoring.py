"""Scoring Dialogue-NLI candidates: log p(candidate + EOS | persona, history) under a model.

Scoring goes through the same code as training: `encode_pair` makes the prompt and each
candidate's ids, and the log-probs come from the training step's `packed_logps` (with a cache,
for the cached layout) and `response_logps`. Three layouts (`LAYOUTS`):

  cached (default)  each example's prompt runs once into a KV cache; its candidates follow in
                    rows of CONTINUATION_ROW tokens that read that cache as a prefix all their
                    segments see (`attention.CACHED_PREFIX`), each candidate its own segment. A
                    candidate token attends to ~P + 128 keys;
  packed            each row holds one example's prompt once and as many of its candidates as
                    fit, each candidate its own segment (`data.packing`): ~700 tokens for an
                    example's ~33 candidates instead of ~7,000 (`packed_logps`), but every
                    token attends over the whole ~700-1,024-token row;
  full              one row [prompt | candidate] per candidate (`response_logps`), the
                    reference the other two are tested against.

All give the same scores up to fp32 summation order. Shapes are bucketed (row length, scored
tokens, rows per call), so only a handful of programs compile; scoring stays fp32 unless the
model says otherwise (bf16 logits move a candidate's summed log-prob by up to ~1 nat), and fp32
means fp32 matmuls on every backend: scoring runs under `jax.default_matmul_precision('highest')`,
where a GPU's default allows TF32 and a TPU's is one bf16 pass.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.data.batches import bucket_length, round_up
from pdpo_jax.data.packing import PackedRow, collate_packed, pack_continuations
from pdpo_jax.eval.dnli import CandidateScore, DnliResult
from pdpo_jax.models.attention import KVCache
from pdpo_jax.models.layers import unstack_layers
from pdpo_jax.train.logprobs import LOGIT_CHUNK, packed_logps, response_logps

log = logging.getLogger(__name__)

SCORING_PRECISION = "highest"  # fp32 operands multiply in fp32 (not TF32 / one bf16 pass)

ROW_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
WINDOW_BUCKETS = (8, 16, 32, 64, 128, 256, 512)
MAX_ROW = 1024  # a row holds an example's prompt and the candidates that fit in this many tokens
PROMPT_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
CONTINUATION_ROW = 128  # cached layout: a row of candidates after the prompt's cache
ROWS_MULTIPLE = 8  # cached layout: rows per call round up to a multiple of this
SCORED_MULTIPLE = 128  # scored tokens per row round up to a multiple of this (few programs)
PACKED_KEYS = ("tokens", "positions", "segments", "pred", "target", "valid")  # packed_logps' order


@dataclasses.dataclass(frozen=True)
class _Example:
    """One example's encoding: the shared prompt and each candidate's ids (EOS included)."""
    index: int
    prompt: np.ndarray
    candidates: list[np.ndarray]


def score_dnli(model, tokenizer, template, examples: Sequence[pdata.DnliExample], *,
               batch_size: int = 4, max_prompt_tokens: int | None = None,
               chunk: int = LOGIT_CHUNK, mesh: Mesh | None = None, progress: bool = True,
               layout: str = "cached") -> DnliResult:
    """Log-likelihood of every candidate of every example under `model`.

    model: an nnx model (or `(graphdef, params)`), placed on `mesh` if given (rows are then split
    over data x fsdp; batch_size rounds up to a multiple of it). layout: one of LAYOUTS;
    batch_size: examples per call ('cached') or rows per call ('packed': one prompt and its
    candidates; 'full': one candidate). An example whose prompt does not fit
    `max_prompt_tokens` is skipped and named in `result.skipped`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"DNLI scoring layout {layout!r}: use one of {sorted(LAYOUTS)}")
    graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
    batch_size = round_up(batch_size, shd.batch_divisor(mesh))  # rows split over data x fsdp
    encoded, prompts, skipped = _encode(tokenizer, template, examples, max_prompt_tokens)
    n_cands = sum(len(e.candidates) for e in encoded)
    sums: dict[tuple[int, int], float] = {}
    start = time.perf_counter()
    calls = LAYOUTS[layout]
    with jax.default_matmul_precision(SCORING_PRECISION), \
            tqdm(total=n_cands, unit="cand", desc="DNLI", disable=not progress) as bar:
        for owners, logp_BQ in calls(graphdef, params, encoded, batch_size,
                                     pdata.pad_id(tokenizer), chunk, mesh):
            done = _accumulate(sums, owners, logp_BQ)
            bar.update(done)
    log.info("DNLI: scored %d candidates of %d examples in %.1fs", n_cands, len(encoded),
             time.perf_counter() - start)
    scores = [_candidate_score(examples[e.index], j, len(ids), sums[(e.index, j)])
              for e in encoded for j, ids in enumerate(e.candidates)]
    return DnliResult(scores, prompts, skipped)


def _encode(tokenizer, template, examples, max_prompt_tokens):
    """(encodings of the examples that fit, their prompt texts by id, skipped ids → reason).
    A prompt budget independent of the candidate keeps the prompt identical across an
    example's candidates (a max_total budget would cut it per candidate)."""
    encoded, prompts, skipped = [], {}, {}
    for i, ex in enumerate(examples):
        try:
            rows = [pdata.encode_pair(tokenizer, template, ex.persona, ex.history, text,
                                      max_prompt_tokens=max_prompt_tokens)
                    for text, _ in ex.candidates]
        except pdata.DoesNotFit as e:
            skipped[ex.example_id] = str(e)
            continue
        encoded.append(_Example(i, rows[0].prompt_ids, [r.response_ids for r in rows]))
        prompts[ex.example_id] = tokenizer.decode(rows[0].prompt_ids)
    if not encoded:
        raise ValueError(f"none of the {len(examples)} DNLI examples fits max_prompt_tokens="
                         f"{max_prompt_tokens} (persona + latest turn); raise eval.max_prompt_tokens")
    if skipped:
        log.warning("DNLI: skipped %d of %d examples that do not fit: %s", len(skipped),
                    len(examples), dict(list(skipped.items())[:3]))
    return encoded, prompts, skipped


def _accumulate(sums: dict, owners: list[list[tuple[int, int] | None]], logp_BQ) -> int:
    """Adds each scored token's log-prob to its candidate's sum (host, float64); the number of
    candidates whose last token this call scored."""
    finished = 0
    for row_owners, row_logp in zip(owners, np.asarray(logp_BQ, np.float64)):
        for q, owner in enumerate(row_owners):
            sums[owner] = sums.get(owner, 0.0) + row_logp[q]
            if q + 1 == len(row_owners) or row_owners[q + 1] != owner:
                finished += 1
    return finished


def _candidate_score(ex: pdata.DnliExample, j: int, n: int, score_sum: float) -> CandidateScore:
    if not math.isfinite(score_sum):
        raise RuntimeError(f"{ex.example_id}: candidate {j} scored {score_sum}")
    text, category = ex.candidates[j]
    return CandidateScore(ex.example_id, ex.group, j, category, text, float(score_sum), n)


def _device(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, shd.row_sharding(mesh, v.ndim)) for k, v in batch.items()}


def _pipelined(batches: Iterator[tuple[list, dict, dict]], score) -> Iterator[tuple[list, np.ndarray]]:
    """(owners, log-probs) per batch of (owners, arrays, static shapes); batch k+1 is dispatched
    before batch k's results are fetched, so the host's collation overlaps the device's work."""
    pending = None
    for owners, batch, static in batches:
        out = score(batch, **static)
        if pending is not None:
            yield pending[0], jax.device_get(pending[1])
        pending = (owners, out)
    if pending is not None:
        yield pending[0], jax.device_get(pending[1])


# --------------------------------------------------------------------------------------------
# Shared prompt: packed rows


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_packed(graphdef, params, batch, *, chunk: int):
    """fp32 log-prob of every scored token [B, Q] (0 on padding)."""
    model = nnx.merge(graphdef, params)
    return packed_logps(model, *(batch[k] for k in PACKED_KEYS), chunk=chunk)


def _packed_calls(graphdef, params, encoded: list[_Example], batch_size: int, pad: int,
                  chunk: int, mesh):
    rows: list[tuple[PackedRow, int]] = []
    for e in encoded:
        longest = len(e.prompt) + max(len(c) for c in e.candidates)
        max_len = max(MAX_ROW, bucket_length(longest, ROW_BUCKETS))
        rows += [(r, e.index) for r in pack_continuations(e.prompt, e.candidates, max_len)]
    rows.sort(key=lambda r: bucket_length(len(r[0]), ROW_BUCKETS))  # stable: file order within

    def batches():
        for lo in range(0, len(rows), batch_size):
            group = rows[lo:lo + batch_size]
            T = bucket_length(max(len(r) for r, _ in group), ROW_BUCKETS)
            Q = min(round_up(max(len(r.target) for r, _ in group), SCORED_MULTIPLE), T)
            padded = [r for r, _ in group] + [None] * (batch_size - len(group))
            arrays = collate_packed(padded, T, Q, pad)
            owners = [[(i, o) for o in r.owner] for r, i in group]
            yield owners, _device({k: arrays[k] for k in PACKED_KEYS}, mesh), \
                {"chunk": min(chunk, Q)}

    yield from _pipelined(batches(), functools.partial(_score_packed, graphdef, params))


# --------------------------------------------------------------------------------------------
# Cached prompt: each prompt's keys and values computed once, its candidates packed in short rows


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_cached(graphdef, params, batch, *, chunk: int):
    """fp32 log-prob of every scored token of the continuation rows [R, Q] (0 on padding).

    The prompts [E, P] (each without its last token, left-padded) run once into a KV cache;
    each continuation row [R, T] reads its example's cache (`row_example`) as a prefix every
    segment sees (`attention.CACHED_PREFIX`) and holds the prompt's last token (part 0, which
    predicts each candidate's first token) and candidates, each its own part. A candidate token
    attends to ~P + its own tokens, where a packed row [prompt | 33 candidates] attends to ~T."""
    model = nnx.merge(graphdef, params)
    prompts = batch["prompt_tokens"]
    cache = KVCache.init(model.cfg, *prompts.shape)
    # Only the cache is used: one selected column keeps the last layer's output small.
    _, cache = model.hidden_states(prompts, batch["prompt_positions"], batch["prompt_mask"],
                                   cache, select_BQ=jnp.zeros((prompts.shape[0], 1), jnp.int32))
    T = batch["tokens"].shape[1]

    def grow(a):  # each row's example's slots, then T free ones for the row's own tokens
        widths = [(0, 0)] * a.ndim
        widths[2 if a.ndim == 4 else 1] = (0, T)  # k, v [B, K, S, H]; positions, valid [B, S]
        return jnp.pad(a[batch["row_example"]], widths)

    rows = KVCache(k=tuple(map(grow, cache.k)), v=tuple(map(grow, cache.v)),
                   positions=grow(cache.positions), valid=grow(cache.valid), length=cache.length)
    return packed_logps(model, *(batch[k] for k in PACKED_KEYS), chunk=chunk, cache=rows)


def _cached_calls(graphdef, params, encoded: list[_Example], batch_size: int, pad: int,
                  chunk: int, mesh):
    """`batch_size` examples per call, in order of prompt length (so a call's prompts share a
    bucket); each example's candidates in rows of CONTINUATION_ROW tokens."""
    # a cached forward loops over the layers in Python: slice the stacked weights once, here
    graphdef, params = nnx.split(unstack_layers(nnx.merge(graphdef, params)))
    order = sorted(encoded, key=lambda e: len(e.prompt))  # stable: file order within a length

    def batches():
        for lo in range(0, len(order), batch_size):
            group = order[lo:lo + batch_size]
            P = bucket_length(max(len(e.prompt) - 1 for e in group), PROMPT_BUCKETS)
            prompt = {"prompt_tokens": np.full((batch_size, P), pad, np.int32),
                      "prompt_positions": np.zeros((batch_size, P), np.int32),
                      "prompt_mask": np.zeros((batch_size, P), bool)}
            rows, row_example, offsets, owners = [], [], [], []
            for i, e in enumerate(group):
                n = len(e.prompt) - 1  # cached; the last prompt token opens every row
                prompt["prompt_tokens"][i, P - n:] = e.prompt[:-1]
                prompt["prompt_positions"][i, P - n:] = np.arange(n)
                prompt["prompt_mask"][i, P - n:] = True
                width = max(CONTINUATION_ROW, 1 + max(len(c) for c in e.candidates))
                for r in pack_continuations(e.prompt[-1:], e.candidates, width):
                    rows.append(r)
                    row_example.append(i)
                    offsets.append(n)
                    owners.append([(e.index, o) for o in r.owner])
            R = round_up(len(rows), math.lcm(ROWS_MULTIPLE, shd.batch_divisor(mesh)))
            T = bucket_length(max(len(r) for r in rows), ROW_BUCKETS)
            Q = min(round_up(max(len(r.target) for r in rows), SCORED_MULTIPLE), T)
            arrays = collate_packed(rows + [None] * (R - len(rows)), T, Q, pad)
            arrays["positions"][:len(rows)] += np.asarray(offsets, np.int32)[:, None]
            arrays = {k: arrays[k] for k in PACKED_KEYS}
            arrays["row_example"] = np.asarray(row_example + [0] * (R - len(rows)), np.int32)
            yield owners, _device(prompt | arrays, mesh), {"chunk": min(chunk, Q)}

    yield from _pipelined(batches(), functools.partial(_score_cached, graphdef, params))


# --------------------------------------------------------------------------------------------
# Full rows: one candidate per row


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "chunk"))
def _score_rows(graphdef, params, batch, *, window: int, chunk: int):
    """fp32 log-prob of each row's response tokens [B, window] (0 past the response)."""
    model = nnx.merge(graphdef, params)
    logp_BR, _ = response_logps(model, batch["tokens"], batch["positions"],
                                batch["attention_mask"], batch["loss_mask"], window=window,
                                chunk=chunk)
    return logp_BR


def _full_row_calls(graphdef, params, encoded: list[_Example], batch_size: int, pad: int,
                    chunk: int, mesh):
    rows = [(e.index, j, pdata.Encoded(e.prompt, c)) for e in encoded
            for j, c in enumerate(e.candidates)]
    rows.sort(key=lambda r: pdata.bucket_length(r[2].length, ROW_BUCKETS))

    def batches():
        for lo in range(0, len(rows), batch_size):
            group = rows[lo:lo + batch_size]
            T = pdata.bucket_length(max(r[2].length for r in group), ROW_BUCKETS)
            R = pdata.bucket_length(max(len(r[2].response_ids) for r in group), WINDOW_BUCKETS)
            padded = [r[2] for r in group] + [None] * (batch_size - len(group))
            batch = pdata.sft_batch(padded, T, pad)
            owners = [[(i, j)] * len(enc.response_ids) for i, j, enc in group]
            yield owners, _device({k: v for k, v in batch.items() if k != "index"}, mesh), \
                {"window": R, "chunk": min(chunk, R)}

    yield from _pipelined(batches(), functools.partial(_score_rows, graphdef, params))


LAYOUTS = {"cached": _cached_calls, "packed": _packed_calls, "full": _full_row_calls}
