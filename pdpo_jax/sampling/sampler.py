"""Jitted KV-cache sampler: one prefill of the left-padded prompts, then a `lax.while_loop` decode.

The compiled program depends only on a static `SamplingLoop` (model graph, `SamplingConfig`,
mesh) and on the shapes [B, P]; prompt lengths are bucketed to a multiple of `prompt_bucket`
and the batch is padded up to the mesh's data-parallel size, so few programs are compiled.

Randomness is per row: sample j of prompt i draws step t with
`fold_in(fold_in(fold_in(key(seed), example_id_i), j), t)`, so a row's samples do not depend on
its batch neighbours, on the batch size or on n.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pdpo_jax import sharding as shd
from pdpo_jax.data.batches import left_pad, round_up
from pdpo_jax.models.attention import KVCache
from pdpo_jax.sampling.decode import (DecodeWeights, check_seed, chosen_logprob, constrain_cache,
                                      decode_graph, decode_logits, is_eos, make_decode_weights,
                                      prefill, row_key, row_sharding)
from pdpo_jax.sampling.filters import sample_tokens

PROMPT_BUCKET = 32  # prompt lengths are rounded up to a multiple of this (few compiled shapes)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. `greedy` ignores temperature/top_k/top_p; top_k=0 and top_p=1 are off.

    eos_ids: tokens that end a row (the EOS is returned and counted in `lengths`); after it
    the row emits `pad_id`. n: samples per prompt. logprobs: also return, per new token, its
    log-probability under the model's unmodified distribution (temperature 1, no filters).
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int = 0
    pad_id: int = 0
    logprobs: bool = False

    def __post_init__(self):
        eos = (self.eos_ids,) if isinstance(self.eos_ids, int) else self.eos_ids
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))
        check_seed(self.seed)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; for argmax decoding "
                             "set greedy=True")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 switches top-k off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 switches top-p off)")
        if self.n < 1:
            raise ValueError(f"n={self.n} samples per prompt must be >= 1")


def stop_ids(tokenizer, eos_token_id=None, generation_config=None) -> tuple[int, ...]:
    """The tokens that end a reply: the tokenizer's EOS, the model config's `eos_token_id` (an id
    or a list) and, given the path of a `generation_config.json`, its `eos_token_id` (a chat
    model often ends turns with its own token, e.g. <|eot_id|>). Sorted; () when none names one."""
    ids = {tokenizer.eos_token_id, *np.atleast_1d(eos_token_id if eos_token_id is not None else [])}
    if generation_config is not None and os.path.isfile(generation_config):
        with open(generation_config) as fh:
            ids.update(np.atleast_1d(json.load(fh).get("eos_token_id") or []))
    return tuple(sorted(int(i) for i in ids - {None}))


@dataclasses.dataclass
class SampleOutput:
    """Host-side result for B prompts; row i*n + j is sample j of prompt i.

    tokens: int32 [B*n, max_new_tokens], `pad_id` past each row's length. lengths: int32
    [B*n], new tokens including the EOS. finish_reason: 'stop' (an EOS was produced) or
    'length'. logprobs: fp32 [B*n, max_new_tokens] (0 past the length) or None.
    """
    tokens: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str]
    logprobs: np.ndarray | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Loop carry; B counts every row (prompts x n, plus mesh padding), S = P + max_new_tokens.

    tokens_BS: int32 prompt then new tokens; positions_B: position of the next token to feed;
    done_B: row produced an EOS (or is padding); lengths_B: new tokens so far (incl. EOS);
    keys_B: one PRNG key per row; step: new tokens so far, also the write column past P;
    logprobs_BT: fp32 [B, max_new] or None.
    """
    tokens_BS: jax.Array
    positions_B: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array
    keys_B: jax.Array
    cache: KVCache
    step: jax.Array
    logprobs_BT: jax.Array | None


@dataclasses.dataclass(frozen=True)
class SamplingLoop:
    """Everything static about generation (hashable: it is jit's static argument).

    graphdef: the model's graph in the decode layout (`decode_model`), the graph of
    `DecodeWeights.params`.
    """
    graphdef: nnx.GraphDef
    cfg: SamplingConfig
    mesh: Mesh | None = None

    def model(self, params):
        """The model in its decode layout, from `DecodeWeights.params`."""
        return nnx.merge(self.graphdef, params)

    def prefill(self, weights: DecodeWeights, tokens_BP, mask_BP):
        """One model call over the whole left-padded prompt batch into a fresh cache.

        Returns (logits of each row's last prompt token fp32 [B, V], cache, next positions
        int32 [B]). Positions count from each row's first real token.
        """
        return self._prefill(self.model(weights.params), tokens_BP, mask_BP)

    def _prefill(self, model, tokens_BP, mask_BP):
        return prefill(model, tokens_BP, mask_BP, tokens_BP.shape[1] + self.cfg.max_new_tokens,
                       self.mesh)

    def init_state(self, model, tokens_BP, mask_BP, live_B, example_ids_B, seed) -> SamplerState:
        """Prefill once per prompt, repeat everything n times, and emit the first token."""
        cfg, n = self.cfg, self.cfg.n
        logits_BV, cache, next_pos_B = self._prefill(model, tokens_BP, mask_BP)
        rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis) if n > 1 else x
        cache = KVCache(k=tuple(rep(k) for k in cache.k), v=tuple(rep(v) for v in cache.v),
                        positions=rep(cache.positions), valid=rep(cache.valid),
                        length=cache.length)
        B = tokens_BP.shape[0] * n
        new_BT = jnp.full((B, cfg.max_new_tokens), cfg.pad_id, jnp.int32)
        state = SamplerState(
            tokens_BS=jnp.concatenate([rep(tokens_BP.astype(jnp.int32)), new_BT], axis=1),
            positions_B=rep(next_pos_B), done_B=~rep(live_B), lengths_B=jnp.zeros(B, jnp.int32),
            keys_B=_row_keys(seed, example_ids_B, n), cache=constrain_cache(cache, self.mesh),
            step=jnp.zeros((), jnp.int32),
            logprobs_BT=jnp.zeros((B, cfg.max_new_tokens), jnp.float32) if cfg.logprobs else None)
        return self.emit(state, rep(logits_BV))

    def emit(self, state: SamplerState, logits_BV) -> SamplerState:
        """Pick each row's next token, write it at column P + step, update done/lengths."""
        cfg = self.cfg
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys_B, state.step)
        token_B = sample_tokens(keys_B, logits_BV, greedy=cfg.greedy, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p)
        token_B = jnp.where(state.done_B, cfg.pad_id, token_B)
        column = state.tokens_BS.shape[1] - cfg.max_new_tokens + state.step
        tokens_BS = jax.lax.dynamic_update_slice(state.tokens_BS, token_B[:, None], (0, column))
        logprobs_BT = state.logprobs_BT
        if cfg.logprobs:
            chosen_B = chosen_logprob(logits_BV, token_B)
            logprobs_BT = jax.lax.dynamic_update_slice(
                logprobs_BT, jnp.where(state.done_B, 0.0, chosen_B)[:, None], (0, state.step))
        return dataclasses.replace(
            state, tokens_BS=tokens_BS, lengths_B=state.lengths_B + (~state.done_B),
            done_B=state.done_B | is_eos(token_B, cfg.eos_ids), step=state.step + 1,
            logprobs_BT=logprobs_BT)

    def cond_fn(self, state: SamplerState):
        """Go on while there are tokens left to make and some row has not stopped."""
        return (state.step < self.cfg.max_new_tokens) & ~jnp.all(state.done_B)

    def body_fn(self, weights: DecodeWeights, state: SamplerState) -> SamplerState:
        """Feed the last emitted token of every row through the cache, emit the next one."""
        model = self.model(weights.params)
        column = state.tokens_BS.shape[1] - self.cfg.max_new_tokens + state.step - 1
        token_B1 = jax.lax.dynamic_slice_in_dim(state.tokens_BS, column, 1, axis=1)
        # Stopped rows keep running (static batch) but their keys are marked invalid.
        h_B1D, cache = model.hidden_states(token_B1, state.positions_B[:, None],
                                           ~state.done_B[:, None], state.cache)
        logits_BV = decode_logits(weights, h_B1D)
        state = dataclasses.replace(state, cache=cache, positions_B=state.positions_B + 1)
        return self.emit(state, logits_BV)

    def run(self, weights: DecodeWeights, tokens_BP, mask_BP, live_B, example_ids_B,
            seed) -> SamplerState:
        """The whole generation (prefill + decode loop); jitted by `_run`."""
        state = self.init_state(self.model(weights.params), tokens_BP, mask_BP, live_B,
                                example_ids_B, seed)
        return jax.lax.while_loop(self.cond_fn, lambda s: self.body_fn(weights, s), state)


# One jit for every loop: the compile cache is keyed by the (hashable) loop and the shapes, so
# Samplers built for the same model and config share their programs.
_run = jax.jit(lambda loop, *args: loop.run(*args), static_argnums=0)


def _row_keys(seed, example_ids_B, n: int):
    """PRNG key [B*n]: `row_key` of each prompt's example id and sample index."""
    ids = jnp.repeat(example_ids_B, n)
    sample = jnp.tile(jnp.arange(n, dtype=jnp.int32), example_ids_B.shape[0])
    return jax.vmap(row_key, in_axes=(None, 0, 0))(seed, ids, sample)


# --------------------------------------------------------------------------------------------
# Host side: padding, bucketing, placement on the mesh, and the result.


class Sampler:
    """Samples continuations from a model: `Sampler(model, cfg).generate([[ids], ...])`.

    model: an nnx model or its `(graphdef, params)`. The sampler keeps the weights in the
    decode layout (`DecodeWeights`), made here once: drop your own reference to the model to
    free its stacked copy. mesh: if given, params are placed with `SAMPLING_RULES` (weights
    tensor-parallel, batch over data x fsdp) and the batch is padded up to data*fsdp with
    dummy rows that are dropped from the output. prompt_bucket: prompt lengths are rounded up
    to a multiple of it, so that few programs are compiled.
    """

    def __init__(self, model, cfg: SamplingConfig, *, mesh: Mesh | None = None,
                 prompt_bucket: int = PROMPT_BUCKET):
        graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.model_cfg = nnx.merge(graphdef, params).cfg
        self.cfg, self.mesh, self.prompt_bucket = cfg, mesh, prompt_bucket
        self._graphdef = graphdef
        self.loop = SamplingLoop(decode_graph(graphdef, params), cfg, mesh)
        self.weights = self.decode_weights(params)

    def decode_weights(self, params) -> DecodeWeights:
        """params (of the model's structure), placed on the mesh, in the decode layout."""
        return make_decode_weights(self._graphdef, params, self.mesh)

    def generate(self, prompts: Sequence[Sequence[int]], *, cfg: SamplingConfig | None = None,
                 seed: int | None = None, example_ids: Sequence[int] | None = None,
                 params=None) -> SampleOutput:
        """Samples for python lists of prompt ids (any lengths); see `sample`."""
        cfg = self.cfg if cfg is None else cfg
        if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token, and there must be one prompt")
        width = round_up(max(len(p) for p in prompts), self.prompt_bucket)
        tokens, mask = left_pad(prompts, cfg.pad_id, width)
        return self.sample(tokens, mask, cfg=cfg, seed=seed, example_ids=example_ids,
                           params=params)

    def sample(self, tokens_BP, mask_BP, *, cfg: SamplingConfig | None = None,
               seed: int | None = None, example_ids: Sequence[int] | None = None,
               params=None) -> SampleOutput:
        """Samples for a left-padded batch: tokens int [B, P], mask bool [B, P].

        cfg: this call's `SamplingConfig` instead of the sampler's (the same weights; each
        config compiles its own program once). seed: overrides cfg.seed (a traced value: no
        recompile). example_ids: int [B], the index folded into each row's key (default
        0..B-1); pass dataset indices to make a prompt's samples independent of which batch it
        lands in. params: new weights of the model's structure (e.g. the policy after a
        training step), again without recompiling; this call then makes their decode layout
        (a second copy while it runs, unless they are in it already).
        """
        cfg = self.cfg if cfg is None else cfg
        tokens_BP, mask_BP = self._check_prompts(np.asarray(tokens_BP), np.asarray(mask_BP), cfg)
        B = tokens_BP.shape[0]
        ids = np.arange(B) if example_ids is None else np.asarray(example_ids)
        if ids.shape != (B,):
            raise ValueError(f"example_ids has shape {ids.shape}; expected ({B},), one per prompt")
        tokens_BP, mask_BP, live_B, ids_B = self._pad_batch(tokens_BP, mask_BP, ids)
        args = self._place_batch(tokens_BP, mask_BP, live_B, ids_B.astype(np.int32))
        seed = jnp.asarray(cfg.seed if seed is None else check_seed(seed), jnp.uint32)
        weights = self.weights if params is None else self.decode_weights(params)
        state = _run(dataclasses.replace(self.loop, cfg=cfg), weights, *args, seed)
        return self._output(state, rows=B * cfg.n, new=cfg.max_new_tokens)

    def _check_prompts(self, tokens_BP, mask_BP, cfg: SamplingConfig):
        """Refuses what would silently go wrong; pads the length up to its bucket."""
        if tokens_BP.ndim != 2 or tokens_BP.shape != mask_BP.shape:
            raise ValueError(f"tokens {tokens_BP.shape} and mask {mask_BP.shape} must both be [B, P]")
        mask_BP = mask_BP.astype(bool)
        if not mask_BP[:, -1].all() or (np.diff(mask_BP.astype(np.int8), axis=1) < 0).any():
            raise ValueError("prompts must be left-padded and non-empty: each mask row is False* "
                             "then True+ (use sampling.left_pad)")
        vocab = self.model_cfg.vocab_size
        if ((tokens_BP < 0) | (tokens_BP >= vocab))[mask_BP].any():
            raise ValueError(f"prompt token ids must be in [0, {vocab}), the model's vocab")
        longest, new = int(mask_BP.sum(1).max()), cfg.max_new_tokens
        if self.model_cfg.arch == "gpt2" and longest + new > self.model_cfg.max_positions:
            raise ValueError(f"a {longest}-token prompt + max_new_tokens={new} exceeds the "
                             f"{self.model_cfg.max_positions} learned positions of this model; "
                             "shorten the prompt or lower max_new_tokens")
        width = round_up(tokens_BP.shape[1], self.prompt_bucket) - tokens_BP.shape[1]
        return (np.pad(tokens_BP, ((0, 0), (width, 0)), constant_values=cfg.pad_id),
                np.pad(mask_BP, ((0, 0), (width, 0))))

    def _pad_batch(self, tokens_BP, mask_BP, ids_B):
        """Appends dummy rows (copies of row 0, born done) up to a multiple of data*fsdp."""
        B = tokens_BP.shape[0]
        extra = round_up(B, shd.batch_divisor(self.mesh)) - B
        take = np.concatenate([np.arange(B), np.zeros(extra, int)])
        live_B = np.arange(B + extra) < B
        ids_B = np.concatenate([ids_B, np.arange(B, B + extra)])
        return tokens_BP[take], mask_BP[take], live_B, ids_B

    def _place_batch(self, *arrays):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, row_sharding(self.mesh, a.ndim)) for a in arrays)

    def _output(self, state: SamplerState, rows: int, new: int) -> SampleOutput:
        tokens, lengths, done, logprobs = jax.device_get(
            (state.tokens_BS[:, -new:], state.lengths_B, state.done_B, state.logprobs_BT))
        return SampleOutput(
            tokens=np.asarray(tokens[:rows]), lengths=np.asarray(lengths[:rows]),
            finish_reason=["stop" if d else "length" for d in done[:rows]],
            logprobs=None if logprobs is None else np.asarray(logprobs[:rows]))


def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
             mesh: Mesh | None = None, prompt_bucket: int = PROMPT_BUCKET, seed: int | None = None,
             example_ids: Sequence[int] | None = None) -> SampleOutput:
    """Left-pads python lists of prompt ids, buckets them and samples; see `Sampler`.

    model: an nnx model or `(graphdef, params)`. Compiled programs are cached across calls
    (keyed by model graph, config, mesh and bucketed shapes).
    """
    sampler = Sampler(model, cfg, mesh=mesh, prompt_bucket=prompt_bucket)
    return sampler.generate(prompts, seed=seed, example_ids=example_ids)
