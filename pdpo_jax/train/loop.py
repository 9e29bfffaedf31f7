"""The one training loop SFT and DPO share: it dispatches steps and keeps the books.

Per step: next host batch → [A, B, …] micro-batches → sharded global arrays → jitted step.
The previous step's metrics are read only after the next step is dispatched, so the host
never stalls the device. Every `eval_every` steps (and at the end): evaluate on dev, export
the model if the selection metric improved, checkpoint the full state for resuming.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.allocator import release_free_memory
from pdpo_jax.checkpoint import Checkpointer
from pdpo_jax.metrics import MetricsWriter
from pdpo_jax.train.state import shard_batch


@dataclasses.dataclass(frozen=True)
class Selection:
    """Model selection: keep the checkpoint with the best `key` of the dev metrics."""
    key: str
    mode: str  # "min" or "max"

    def better(self, new: float, best: float | None) -> bool:
        return best is None or (new < best if self.mode == "min" else new > best)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    name: str
    total_steps: int
    grad_accum: int
    log_every: int
    eval_every: int
    save_every: int
    selection: Selection


def micro_batches(batch: dict, grad_accum: int) -> dict:
    """Host batch [A·b, …] → [A, b, …]."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"host batch of {x.shape[0]} rows does not split into grad_accum="
                             f"{grad_accum} micro-batches")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return {k: split(np.asarray(v)) for k, v in batch.items() if k != "index"}


def _tokens(batch: dict) -> tuple[int, int]:
    """(real tokens, token slots) of a host batch: attention masks, or the segments of packed
    rows; slots - tokens is the padding the step computes on (logged as padding_share, of the
    process that logs)."""
    masks = [np.asarray(batch["segments"]) > 0] if "segments" in batch else [
        np.asarray(v) for k, v in batch.items() if k.endswith("attention_mask")]
    return int(sum(m.sum() for m in masks)), int(sum(m.size for m in masks))


def run(spec: LoopSpec, *, state, step_fn: Callable, batches, mesh, evaluate: Callable[[object], dict],
        export: Callable[[object, dict], None], ckpt: Checkpointer, writer: MetricsWriter,
        meta: dict):
    """Trains to `spec.total_steps`, resuming from `ckpt` when it holds a step. Returns
    (final state, best dev metrics)."""
    iterator = batches.iterator()
    best = None
    if ckpt.latest_step() is not None:
        state, data_state, saved = ckpt.restore(state, meta)
        iterator.set_state(data_state)
        best = saved.get("best")
    start = int(state.step)
    if start >= spec.total_steps:
        return state, best
    if best is None and start == 0:
        best = _evaluate_and_select(spec, state, 0, evaluate, export, writer, None)

    bar = tqdm(total=spec.total_steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True)
    pending = None  # (step index, metrics, tokens) of the step whose metrics are unread
    for step in range(start, spec.total_steps):
        done = step + 1
        closes_window = done % spec.eval_every == 0 or done == spec.total_steps
        host_batch = next(iterator)
        tokens, slots = _tokens(host_batch)
        state, metrics = step_fn(state, shard_batch(micro_batches(host_batch, spec.grad_accum), mesh))
        if step == start:  # the step is compiled now: return compile-time garbage to the OS
            release_free_memory()
            rate = _Rate()  # and leave the compilation out of the first window's rate
        if pending is not None:
            _report(spec, pending, writer, bar, rate)
        pending = (step + 1, {**metrics, "padding_share": 1.0 - tokens / max(slots, 1)},
                   tokens * jax.process_count())
        if closes_window:
            _report(spec, pending, writer, bar, rate)
            pending = None
            best = _evaluate_and_select(spec, state, done, evaluate, export, writer, best)
            ckpt.save(done, state, iterator.get_state(), {**meta, "best": best})
            rate = _Rate()  # the next window's rate leaves the evaluation out
        elif spec.save_every and done % spec.save_every == 0:
            ckpt.save(done, state, iterator.get_state(), {**meta, "best": best})
    if pending is not None:
        _report(spec, pending, writer, bar, rate)
    bar.close()
    return state, best


class _Rate:
    """Tokens per second of wall time since the window began (the first step's dispatch, then
    each evaluation's end). A per-report interval would lie where a backend runs a step inside its
    call (CPU): two reports can then land back to back, one timing two steps, the other none."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


def _report(spec: LoopSpec, pending, writer: MetricsWriter, bar, rate: _Rate) -> None:
    step, metrics, tokens = pending
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
        raise FloatingPointError(
            f"{spec.name}: non-finite loss or gradient at step {step}; the update was skipped "
            "and the last checkpoint is untouched. Lower the learning rate or check the data")
    metrics = {**metrics, "tokens_per_s": rate.add(tokens)}
    if step % spec.log_every == 0 or step == spec.total_steps:
        writer.write(step, metrics, prefix="train/")
    bar.update(1)
    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")


def _evaluate_and_select(spec, state, step, evaluate, export, writer, best):
    dev = evaluate(state.params)
    writer.write(step, dev, prefix="eval/")
    value = float(dev[spec.selection.key])
    if spec.selection.better(value, None if best is None else best["value"]):
        export(state.params, {"step": step, **dev})
        best = {"step": step, "value": value, "key": spec.selection.key}
    return best
