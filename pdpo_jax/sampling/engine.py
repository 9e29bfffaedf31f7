"""Continuous batching: a fixed set of decode slots over one preallocated KV cache.

A static batch decodes until its longest row stops; here a slot whose row stopped takes the
next prompt while the other slots keep decoding. Three jitted programs, scheduled from the host:

  admit   prefill a few new prompts (left-padded to a length bucket, batch padded to a power of
          two: few programs compile), write their keys and values into free slots, emit each
          row's first token;
  decode  up to `steps_per_call` decode steps of every slot, returning early once enough rows
          have stopped that the queue can refill them;
  (init)  the empty state.

The cache is a ring: every decode step writes all slots at one shared column c (then c+1 …),
the single dynamic-update-slice the static sampler's step makes. A row admitted at column c with
room for m new tokens has its n prompt tokens written at columns [c + m, c + m + n) (mod S), so
its own decode writes [c, c + m) never reach its prompt; attention masks keys by validity and
position, never by column, so where a key sits does not matter. S ≥ n + m for every row.

A row's random stream is `decode.row_key(seed, example id, sample)` folded with its token index,
exactly as in the static sampler: its tokens never depend on its slot, its neighbours or when it
was admitted, so a resumed or resharded run draws the same replies, and greedy output equals
the static sampler's. Rows carry their own sampling settings (`filters.RowSampling`), so
requests with different temperatures share one compiled step.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence

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
from pdpo_jax.sampling.filters import RowSampling, sample_rows
from pdpo_jax.sampling.sampler import SampleOutput, SamplingConfig


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static about an engine's programs (hashable: jit's static argument).

    graphdef: the decode layout's graph; slots: B rows decoded at once; cache_len: S columns of
    the ring; max_new: M columns of the token buffer (no row makes more); max_top_k: static
    bound on any row's top_k (0: top-k off everywhere); logprobs: report each token's log-prob.
    """
    graphdef: nnx.GraphDef
    slots: int
    cache_len: int
    max_new: int
    eos_ids: tuple[int, ...]
    pad_id: int
    max_top_k: int = 0
    logprobs: bool = False
    mesh: Mesh | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decode state [B, ...]; `cache.length` is the ring column the next step writes.

    token_B: the last emitted token (fed next) at position_B; step_B: new tokens so far (EOS
    included); done_B: stopped (EOS, max_new_B reached) or empty; stopped_B: stopped by an EOS;
    tokens_BM, logprobs_BM: the new tokens and their log-probs (pad / 0 past step_B).
    """
    cache: KVCache
    token_B: jax.Array
    position_B: jax.Array
    step_B: jax.Array
    max_new_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    keys_B: jax.Array
    tokens_BM: jax.Array
    logprobs_BM: jax.Array | None
    rows: RowSampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NewRows:
    """What admission writes into the slots of A new rows (each [A])."""
    slot_A: jax.Array        # target slot; `slots` (out of range) for padding rows
    example_id_A: jax.Array
    sample_A: jax.Array
    seed_A: jax.Array
    max_new_A: jax.Array
    rows: RowSampling


def _rows(fill, B: int) -> RowSampling:
    return RowSampling(jnp.full(B, fill, bool), jnp.ones(B, jnp.float32), jnp.zeros(B, jnp.int32),
                       jnp.ones(B, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _init(spec: EngineSpec, weights: DecodeWeights) -> SlotState:
    """Every slot empty (done), the ring at column 0."""
    model = nnx.merge(spec.graphdef, weights.params)
    B, M = spec.slots, spec.max_new
    cache = dataclasses.replace(KVCache.init(model.cfg, B, spec.cache_len), empty=False)
    return SlotState(
        cache=constrain_cache(cache, spec.mesh), token_B=jnp.full(B, spec.pad_id, jnp.int32),
        position_B=jnp.zeros(B, jnp.int32), step_B=jnp.zeros(B, jnp.int32),
        max_new_B=jnp.ones(B, jnp.int32), done_B=jnp.ones(B, bool), stopped_B=jnp.zeros(B, bool),
        keys_B=jax.vmap(row_key, in_axes=(None, 0, None))(0, jnp.arange(B), 0),
        tokens_BM=jnp.full((B, M), spec.pad_id, jnp.int32),
        logprobs_BM=jnp.zeros((B, M), jnp.float32) if spec.logprobs else None, rows=_rows(True, B))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _admit(spec: EngineSpec, weights: DecodeWeights, state: SlotState, tokens_AP, mask_AP,
           new: NewRows) -> SlotState:
    """Prefill A left-padded prompts, write their keys/values into slots `new.slot_A` and emit
    their first tokens; padding rows (slot out of range) are dropped by every write."""
    model = nnx.merge(spec.graphdef, weights.params)
    A, P = tokens_AP.shape
    logits_AV, fresh, next_pos_A = prefill(model, tokens_AP, mask_AP, P)
    # A row's real tokens end at column c + max_new + n - 1: its own decode window [c, c +
    # max_new) is never reached, whatever the batch's padded width P (padding lands earlier).
    start_A1 = (state.cache.length + new.max_new_A + next_pos_A - P)[:, None]
    cols_AP = (start_A1 + jnp.arange(P)[None]) % spec.cache_len
    positions_AP = jnp.maximum(jnp.cumsum(mask_AP, axis=1, dtype=jnp.int32) - 1, 0)
    slot_A1, put = new.slot_A[:, None], functools.partial(_put, slot_A=new.slot_A)
    write = lambda old, kv: old.at[slot_A1, :, cols_AP].set(  # noqa: E731  [A, P, K, H]
        kv.swapaxes(1, 2).astype(old.dtype), mode="drop")
    cache = KVCache(
        k=tuple(write(o, f) for o, f in zip(state.cache.k, fresh.k)),
        v=tuple(write(o, f) for o, f in zip(state.cache.v, fresh.v)),
        positions=state.cache.positions.at[slot_A1, cols_AP].set(positions_AP, mode="drop"),
        valid=put(state.cache.valid, False).at[slot_A1, cols_AP].set(mask_AP, mode="drop"),
        length=state.cache.length)
    keys_A = jax.vmap(row_key)(new.seed_A, new.example_id_A, new.sample_A)
    token_A = sample_rows(jax.vmap(jax.random.fold_in)(keys_A, jnp.zeros(A, jnp.int32)), logits_AV,
                          new.rows, max_top_k=spec.max_top_k)
    eos_A = is_eos(token_A, spec.eos_ids)
    first_AM = jnp.full((A, spec.max_new), spec.pad_id, jnp.int32).at[:, 0].set(token_A)
    logprobs_BM = state.logprobs_BM
    if spec.logprobs:
        first_lp_AM = jnp.zeros((A, spec.max_new), jnp.float32).at[:, 0].set(
            chosen_logprob(logits_AV, token_A))
        logprobs_BM = put(logprobs_BM, first_lp_AM)
    return SlotState(
        cache=constrain_cache(cache, spec.mesh), token_B=put(state.token_B, token_A),
        position_B=put(state.position_B, next_pos_A), step_B=put(state.step_B, 1),
        max_new_B=put(state.max_new_B, new.max_new_A),
        done_B=put(state.done_B, eos_A | (new.max_new_A <= 1)),
        stopped_B=put(state.stopped_B, eos_A), keys_B=put(state.keys_B, keys_A),
        tokens_BM=put(state.tokens_BM, first_AM), logprobs_BM=logprobs_BM,
        rows=jax.tree.map(put, state.rows, new.rows))


def _put(old, value, *, slot_A):
    """old with rows slot_A set to value (dropped where the slot is out of range)."""
    return old.at[slot_A].set(value, mode="drop")


def _step(spec: EngineSpec, weights: DecodeWeights, state: SlotState) -> SlotState:
    """One decode step of every slot: feed each row's last token at the ring column, emit the
    next (stopped rows run too, their keys marked invalid, and emit nothing)."""
    model = nnx.merge(spec.graphdef, weights.params)
    active_B = ~state.done_B
    h_B1D, cache = model.hidden_states(state.token_B[:, None], state.position_B[:, None],
                                       active_B[:, None], state.cache)
    cache = constrain_cache(dataclasses.replace(cache, length=cache.length % spec.cache_len), spec.mesh)
    logits_BV = decode_logits(weights, h_B1D)
    keys_B = jax.vmap(jax.random.fold_in)(state.keys_B, state.step_B)
    token_B = jnp.where(active_B, sample_rows(keys_B, logits_BV, state.rows,
                                              max_top_k=spec.max_top_k), spec.pad_id)
    at_step_BM = active_B[:, None] & (jnp.arange(spec.max_new)[None] == state.step_B[:, None])
    logprobs_BM = state.logprobs_BM
    if spec.logprobs:
        logprobs_BM = jnp.where(at_step_BM, chosen_logprob(logits_BV, token_B)[:, None], logprobs_BM)
    eos_B = active_B & is_eos(token_B, spec.eos_ids)
    step_B = state.step_B + active_B
    return dataclasses.replace(
        state, cache=cache, token_B=token_B, position_B=state.position_B + active_B,
        step_B=step_B, done_B=state.done_B | eos_B | (step_B >= state.max_new_B),
        stopped_B=state.stopped_B | eos_B, logprobs_BM=logprobs_BM,
        tokens_BM=jnp.where(at_step_BM, token_B[:, None], state.tokens_BM))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(spec: EngineSpec, weights: DecodeWeights, state: SlotState, live_B, steps,
            refill_at) -> SlotState:
    """Up to `steps` decode steps; stops early when every slot is done, or when at least
    `refill_at` live rows have stopped (0: never), so that their slots can take new prompts."""
    def go_on(carry):
        i, s = carry
        finished = jnp.sum(s.done_B & live_B)
        return (i < steps) & ~jnp.all(s.done_B) & ((refill_at == 0) | (finished < refill_at))

    return jax.lax.while_loop(go_on, lambda c: (c[0] + 1, _step(spec, weights, c[1])),
                              (jnp.asarray(0, jnp.int32), state))[1]


# --------------------------------------------------------------------------------------------
# Host side: requests, the scheduler, the batch API.


@dataclasses.dataclass
class Request:
    """One sequence to generate: a prompt, its random stream (seed, example id, sample index),
    its own sampling settings and token budget. `on_tokens(request, new_tokens)` (optional) is
    called with each batch of new tokens as they are made (streaming; `logprobs`, when the
    engine reports them, then already covers those tokens); the result is filled in when the
    row stops."""
    prompt: Sequence[int]
    max_new: int
    example_id: int = 0
    sample: int = 0
    seed: int = 0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    on_tokens: Callable[["Request", list[int]], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # 'stop' (an EOS) or 'length'


class Scheduler:
    """Feeds requests through an engine's slots: admit into free slots, decode, hand back.

    `submit` queues a request; `step` admits what fits and runs one decode call; `cancel`
    drops one; `busy` says whether anything is queued or decoding. Not thread-safe: one thread
    drives it.
    """

    def __init__(self, spec: EngineSpec, weights: DecodeWeights, *, prompt_bucket: int = 32,
                 steps_per_call: int = 8, refill_at: int | None = None,
                 prompt_width: int | None = None):
        """prompt_width: prefill every admitted batch at this width (a multiple of
        prompt_bucket) instead of its longest prompt's bucket: one admit program per batch size."""
        self.spec, self.weights = spec, weights
        self.prompt_bucket, self.steps_per_call = prompt_bucket, steps_per_call
        self.prompt_width = prompt_width
        self.refill_at = refill_at or max(1, spec.slots // 8)
        self.state = _init(spec, weights)
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * spec.slots
        self.reported = np.zeros(spec.slots, np.int64)
        self.slot_steps = self.useful_steps = 0  # decode slot-steps run, and those that made a token

    def check(self, request: Request) -> None:
        """Refuses a request that cannot fit this engine (before it is queued)."""
        n, S = len(request.prompt), self.spec.cache_len
        if n == 0:
            raise ValueError("a prompt needs at least one token")
        if not 1 <= request.max_new <= self.spec.max_new:
            raise ValueError(f"max_new={request.max_new} must be in [1, {self.spec.max_new}]")
        if self.prompt_width is not None and n > self.prompt_width:
            raise ValueError(f"a {n}-token prompt exceeds this scheduler's prompt_width="
                             f"{self.prompt_width}")
        if n + request.max_new > S or round_up(n, self.prompt_bucket) > S:
            raise ValueError(f"a {n}-token prompt + {request.max_new} new tokens exceeds the "
                             f"engine's {S}-token context")
        if request.top_k > self.spec.max_top_k:
            raise ValueError(f"top_k={request.top_k} exceeds this engine's max_top_k="
                             f"{self.spec.max_top_k}")
        check_seed(request.seed)

    def submit(self, request: Request) -> None:
        self.check(request)
        self.queue.append(request)

    def cancel(self, request: Request) -> bool:
        """Drops a queued or decoding request (no further tokens, never handed back by `step`);
        its slot is free for the next admission. False when it is neither (already ended)."""
        queued = [r for r in self.queue if r is not request]  # by identity: Requests compare by value
        if len(queued) < len(self.queue):
            self.queue = collections.deque(queued)
            return True
        for i, r in enumerate(self.slots):
            if r is request:
                done = np.array(jax.device_get(self.state.done_B))  # host copy: keep the sharding
                done[i] = True
                self.state = dataclasses.replace(
                    self.state, done_B=jax.device_put(done, self.state.done_B.sharding))
                self.slots[i] = None
                return True
        return False

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    def step(self) -> list[Request]:
        """Admit queued requests into free slots, run one decode call; the requests that ended."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        if free and self.queue:
            self._admit(free[:len(self.queue)])
        finished = self._harvest()  # rows that ended at their first token
        if any(r is not None for r in self.slots):
            live = np.array([r is not None for r in self.slots])
            before = np.asarray(self.state.step_B)
            self.state = _decode(self.spec, self.weights, self.state, jnp.asarray(live),
                                 jnp.int32(self.steps_per_call),
                                 jnp.int32(self.refill_at if self.queue else 0))
            made = np.asarray(self.state.step_B) - before
            self.useful_steps += int(made[live].sum())
            self.slot_steps += int(made.max(initial=0)) * self.spec.slots
            finished += self._harvest()
        return finished

    def _admit(self, free: list[int]) -> None:
        batch = [self.queue.popleft() for _ in free]
        width = self.prompt_width or round_up(max(len(r.prompt) for r in batch), self.prompt_bucket)
        A = 1 << (len(batch) - 1).bit_length()  # a power of two: few programs compile
        A = round_up(A, shd.batch_divisor(self.spec.mesh))
        prompts = [list(r.prompt) for r in batch] + [list(batch[0].prompt)] * (A - len(batch))
        tokens, mask = left_pad(prompts, self.spec.pad_id, width)
        pad = lambda values, fill: list(values) + [fill] * (A - len(batch))  # noqa: E731
        new = NewRows(
            slot_A=np.asarray(pad(free, self.spec.slots), np.int32),
            example_id_A=np.asarray(pad([r.example_id for r in batch], 0), np.int32),
            sample_A=np.asarray(pad([r.sample for r in batch], 0), np.int32),
            seed_A=np.asarray(pad([r.seed for r in batch], 0), np.uint32),
            max_new_A=np.asarray(pad([r.max_new for r in batch], 1), np.int32),
            rows=RowSampling(np.asarray(pad([r.greedy for r in batch], True)),
                             np.asarray(pad([r.temperature or 1.0 for r in batch], 1.0), np.float32),
                             np.asarray(pad([r.top_k for r in batch], 0), np.int32),
                             np.asarray(pad([r.top_p for r in batch], 1.0), np.float32)))
        self.state = _admit(self.spec, self.weights, self.state, *self._place(tokens, mask),
                            jax.tree.map(jnp.asarray, new))
        for slot, request in zip(free, batch):
            self.slots[slot], self.reported[slot] = request, 0

    def _place(self, *arrays):
        if self.spec.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, row_sharding(self.spec.mesh, a.ndim)) for a in arrays)

    def _harvest(self) -> list[Request]:
        """Streams new tokens to their requests; completes and frees the rows that stopped."""
        s = self.state
        done, steps, stopped = jax.device_get((s.done_B, s.step_B, s.stopped_B))
        streaming = any(r is not None and r.on_tokens for r in self.slots)
        ending = [i for i, r in enumerate(self.slots) if r is not None and done[i]]
        if not ending and not streaming:
            return []
        tokens, logprobs = jax.device_get((s.tokens_BM, s.logprobs_BM))
        finished = []
        for i, r in enumerate(self.slots):
            if r is None:
                continue
            if r.on_tokens and steps[i] > self.reported[i]:
                if logprobs is not None:
                    r.logprobs = logprobs[i, :steps[i]].tolist()
                r.on_tokens(r, tokens[i, self.reported[i]:steps[i]].tolist())
                self.reported[i] = steps[i]
            if done[i]:
                r.tokens = tokens[i, :steps[i]].tolist()
                r.logprobs = None if logprobs is None else logprobs[i, :steps[i]].tolist()
                r.finish_reason = "stop" if stopped[i] else "length"
                finished.append(r)
                self.slots[i] = None
        return finished


class Engine:
    """Continuous-batching generation on one model: `Engine(model, cfg).generate(prompts)`.

    model: an nnx model or `(graphdef, params)`; its weights are laid out once for decoding
    (drop your own reference to free the stacked copy). cfg: the default `SamplingConfig`.
    slots: rows decoded at once (a multiple of the mesh's data x fsdp); steps_per_call: decode
    steps per dispatch; prompt_bucket: prompt lengths round up to a multiple of it.
    prefill: how wide a batch of admitted prompts is prefilled when the caller gives its prompt
    budget (`generate(max_prompt_len=)`): 'budget' (default) pads every batch to the budget,
    one admit program per batch size, and a row's padding no longer depends on which prompts
    share its admission; 'tight' pads to the batch's longest prompt, less compute per admit but
    one program per batch size x width bucket. Measured on the negatives stage (SmolLM2, 640
    records, 2 CPU cores): 'budget' 282 s with 36 s of compiles, 'tight' 320–354 s with 77–92 s;
    on an H200 the compiles were most of the stage. In bf16 the padding width can move logits
    enough to flip a sampled token, so the two modes draw different replies there (in fp32 the
    same, up to summation order).
    """

    def __init__(self, model, cfg: SamplingConfig, *, slots: int = 32, mesh: Mesh | None = None,
                 prompt_bucket: int = 32, steps_per_call: int = 8,
                 prefill: str = "budget"):
        graphdef, params = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.model_cfg = nnx.merge(graphdef, params).cfg
        if slots % shd.batch_divisor(mesh):
            raise ValueError(f"slots={slots} must be a multiple of data*fsdp = "
                             f"{shd.batch_divisor(mesh)}")
        self.cfg, self.mesh, self.slots = cfg, mesh, slots
        self.prompt_bucket, self.steps_per_call = prompt_bucket, steps_per_call
        if prefill not in ("budget", "tight"):
            raise ValueError(f"prefill={prefill!r}: expected 'budget' or 'tight'")
        self.prefill = prefill
        self._graph = decode_graph(graphdef, params)
        self.weights = make_decode_weights(graphdef, params, mesh)
        self.last_stats: dict[str, float] = {}

    def spec(self, cfg: SamplingConfig, cache_len: int) -> EngineSpec:
        return EngineSpec(self._graph, self.slots, cache_len, cfg.max_new_tokens, cfg.eos_ids,
                          cfg.pad_id, max_top_k=cfg.top_k, logprobs=cfg.logprobs, mesh=self.mesh)

    def scheduler(self, cfg: SamplingConfig | None = None, *, cache_len: int,
                  prompt_width: int | None = None) -> Scheduler:
        """A scheduler over this engine's slots with a ring of `cache_len` columns."""
        cfg = self.cfg if cfg is None else cfg
        return Scheduler(self.spec(cfg, cache_len), self.weights, prompt_bucket=self.prompt_bucket,
                         steps_per_call=self.steps_per_call, prompt_width=prompt_width)

    def requests(self, prompts, cfg: SamplingConfig, example_ids, seed) -> list[Request]:
        """Request j of prompt i (row i*n + j of the output), as `SamplingConfig` says."""
        ids = range(len(prompts)) if example_ids is None else example_ids
        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} example_ids for {len(prompts)} prompts")
        seed = cfg.seed if seed is None else check_seed(seed)
        return [Request(list(map(int, p)), cfg.max_new_tokens, int(e), j, seed, cfg.greedy,
                        cfg.temperature, cfg.top_k, cfg.top_p)
                for p, e in zip(prompts, ids) for j in range(cfg.n)]

    def generate(self, prompts: Sequence[Sequence[int]], *, cfg: SamplingConfig | None = None,
                 example_ids: Sequence[int] | None = None, seed: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 max_prompt_len: int | None = None) -> SampleOutput:
        """Samples for python lists of prompt ids; row i*n + j of the result is sample j of
        prompt i, as `Sampler.generate` returns it. example_ids: folded into each row's key
        (default 0..len-1): pass dataset indices to make a prompt's samples independent of the
        call it comes in. progress(k): called with the number of rows that just finished.
        max_prompt_len: the longest prompt any of the caller's calls passes (its prompt budget).
        The ring is sized by it instead of by this call's longest prompt, so a caller that loops
        (over shards, rollouts) compiles one set of programs, not one per distinct longest
        prompt; with `prefill='budget'` every admitted batch is also prefilled at that width."""
        cfg = self.cfg if cfg is None else cfg
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token, and there must be one prompt")
        longest = max(len(p) for p in prompts)
        if max_prompt_len is not None and longest > max_prompt_len:
            raise ValueError(f"a {longest}-token prompt exceeds max_prompt_len={max_prompt_len}")
        requests = self.requests(prompts, cfg, example_ids, seed)
        width = round_up(max(longest, max_prompt_len or 0), self.prompt_bucket)
        fixed = max_prompt_len is not None and self.prefill == "budget"
        scheduler = self.scheduler(cfg, cache_len=width + cfg.max_new_tokens,
                                   prompt_width=width if fixed else None)
        for r in requests:
            scheduler.submit(r)
        while scheduler.busy:
            done = scheduler.step()
            if progress is not None and done:
                progress(len(done))
        self.last_stats = {"slot_steps": scheduler.slot_steps, "useful_steps": scheduler.useful_steps}
        return _output(requests, cfg)


def _output(requests: list[Request], cfg: SamplingConfig) -> SampleOutput:
    M = cfg.max_new_tokens
    tokens = np.full((len(requests), M), cfg.pad_id, np.int32)
    logprobs = np.zeros((len(requests), M), np.float32) if cfg.logprobs else None
    for i, r in enumerate(requests):
        tokens[i, :len(r.tokens)] = r.tokens
        if logprobs is not None:
            logprobs[i, :len(r.logprobs)] = r.logprobs
    return SampleOutput(tokens, np.asarray([len(r.tokens) for r in requests], np.int32),
                        [r.finish_reason for r in requests], logprobs)
