"""Reference log-probs computed once and cached on disk (`dpo.precompute_ref`).

DPO's reference model is frozen, so log π_ref(y|x) of every chosen and rejected reply can be
computed in one pass before training; the step then reads them from the batch and the
reference weights are freed, so a large model is held once, not twice. The cache file is keyed
by a hash of (reference checkpoint, pairs file, token budgets, template, tokenizer): any change
recomputes, an unchanged rerun reuses.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.fileio import atomic_path, file_digest
from pdpo_jax.train import state as st
from pdpo_jax.train.logprobs import LOGIT_CHUNK
from pdpo_jax.train.steps import pair_logps


def cache_key(reference: str | None, pairs: pathlib.Path, data_cfg, tokenizer, seed: int) -> str:
    ref = {"random_init_seed": seed}
    if reference is not None:
        folder = pathlib.Path(reference)
        ref = {"config": (folder / "config.json").read_text(),
               "weights": sorted(file_digest(p, header_only=True) for p in folder.glob("*.safetensors"))}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    blob = json.dumps({"reference": ref, "pairs": file_digest(pairs), "tokenizer": vocab,
                       "max_total_tokens": data_cfg.max_total_tokens, "template": data_cfg.template,
                       "max_response_tokens": data_cfg.max_response_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _gather(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def compute(graphdef, ref_params, batches, n: int, mesh, *, window: int,
            share_prompt: bool = False) -> np.ndarray:
    """float32[n, 2]: (chosen, rejected) summed reference log-probs per example, in order."""
    fn = jax.jit(lambda p, b: pair_logps(graphdef, p, b, window=window, chunk=LOGIT_CHUNK,
                                         share_prompt=share_prompt)[:2])
    out = np.full((n, 2), np.nan, np.float32)
    for batch in tqdm(batches.iterator(), total=len(batches), desc="reference log-probs", unit="batch"):
        index = batch.pop("index")
        sharded = st.shard_batch({k: np.asarray(v)[None] for k, v in batch.items()}, mesh)
        chosen, rejected = fn(ref_params, {k: v[0] for k, v in sharded.items()})
        index = _gather(index) if jax.process_count() > 1 else index
        keep = index >= 0
        out[index[keep], 0] = _gather(chosen)[keep]
        out[index[keep], 1] = _gather(rejected)[keep]
    if np.isnan(out).any():
        raise RuntimeError(f"reference log-probs missing for {int(np.isnan(out[:, 0]).sum())} examples")
    return out


def load_or_compute(path: pathlib.Path, make) -> np.ndarray:
    """The cached array at `path`, or `make()` saved there atomically (by process 0)."""
    if path.is_file():
        return np.load(path)
    values = make()
    if jax.process_index() == 0:
        with atomic_path(path, suffix=".tmp.npy") as tmp:
            np.save(tmp, values)
    return values


class WithReference:
    """A Batches stream whose batches also carry `ref_{chosen,rejected}_logps` [B] by index."""

    def __init__(self, batches, ref: np.ndarray):
        self.batches, self.ref = batches, ref
        self.batches_per_epoch = batches.batches_per_epoch

    def __len__(self):
        return len(self.batches)

    def iterator(self):
        return _RefIterator(self.batches.iterator(), self.ref)


class _RefIterator:
    def __init__(self, inner, ref):
        self.inner, self.ref = inner, ref

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        index = batch["index"]
        values = np.where(index[:, None] >= 0, self.ref[np.maximum(index, 0)], 0.0)
        batch["ref_chosen_logps"] = values[:, 0].astype(np.float32)
        batch["ref_rejected_logps"] = values[:, 1].astype(np.float32)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)
