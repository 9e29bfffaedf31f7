"""grain pipelines: seeded, length-bucketed, host-sharded, checkpointable batch streams.

Each epoch has a batch plan (`plan_epoch`): int64[num_batches, B] of example indices, -1 marking a
fully-masked padding row. With shuffle, the epoch's examples are a seeded permutation; examples are
then grouped by length bucket (random order inside a bucket) and cut into global batches of B, and
the batches are shuffled. So almost every batch holds one bucket and a jitted step compiles one
shape per bucket; a batch straddling two buckets is padded to the larger one.

The global batch size B is fixed. drop_remainder=True (training) leaves out N % B examples per
epoch, chosen at random from the permutation (not always the longest); drop_remainder=False
(evaluation, shuffle=False keeps input order) pads the last batch with fully-masked rows.

Per host: process p of P takes rows [p*B/P, (p+1)*B/P) of every global batch; T is the bucket of the
whole global batch, so all hosts build the same shapes. Batch k of the stream is epoch k // n,
batch k % n, which makes the grain dataset random-access and its iterator state one integer.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from pdpo_jax.data.batches import (
    DEFAULT_BUCKETS,
    EncodedText,
    bucket_length,
    classification_batch,
    preference_batch,
    prompt_batch,
    round_up,
    sft_batch,
)
from pdpo_jax.data.encode import Encoded, EncodedPair
from pdpo_jax.data.packing import packed_batch, packed_needs
from pdpo_jax.errors import UserError


def plan_epoch(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], *, seed: int,
               epoch: int, shuffle: bool = True, drop_remainder: bool = True) -> np.ndarray:
    """int64[num_batches, batch_size] example indices of one epoch, -1 for padding rows."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        if drop_remainder:
            order = order[:n - n % batch_size]
        bucket_of = np.searchsorted(np.sort(buckets), lengths[order], side="left")
        order = order[np.argsort(bucket_of, kind="stable")]
    else:
        order = np.arange(n)
        if drop_remainder:
            order = order[:n - n % batch_size]
    pad = -len(order) % batch_size
    plan = np.concatenate([order, np.full(pad, -1)]).reshape(-1, batch_size)
    return plan[rng.permutation(len(plan))] if shuffle else plan


@dataclasses.dataclass(frozen=True, eq=False)
class Batches:
    """A host's batch stream: `batches[k]` is host-local batch k; `iterator()` streams them."""

    dataset: grain.MapDataset
    batches_per_epoch: int
    fingerprint: str  # identifies data + settings, checked when an iterator state is restored
    source: "_BatchSource | None" = None

    def epoch_shapes(self, epoch: int = 0) -> list[tuple[int, int]]:
        """(rows, row length) of every global batch of an epoch, in this stream's layout (one
        row per example padded to its bucket, or the epoch's packed rows), from the plan alone:
        nothing is collated."""
        return self.source.shapes(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self.dataset[k]

    def iterator(self, *, num_threads: int = 2, prefetch: int = 4) -> BatchIterator:
        """A checkpointable iterator; threads collate the next `prefetch` batches ahead."""
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        return BatchIterator(self.dataset.to_iter_dataset(options).__iter__(), self.fingerprint)


class BatchIterator(grain.DatasetIterator):
    """grain iterator whose state is {"next_index": int, "fingerprint": str} (JSON-serialisable)."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str):
        super().__init__(parent)
        self._fingerprint = fingerprint

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"next_index": int(self._parent.get_state()["next_index"]),
                "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise UserError(f"iterator state is for pipeline {state.get('fingerprint')!r}, not "
                            f"{self._fingerprint!r}: data, batch size, buckets, seed or host "
                            "layout changed since the checkpoint")
        self._parent.set_state({"next_index": int(state["next_index"])})


@dataclasses.dataclass(frozen=True)
class Packing:
    """Training batches packed into rows of `row_len` tokens (`packing.packed_batch`): each host
    batch's `micro_batches` slices are packed alone, each into the epoch's largest row count
    rounded up to a multiple of `row_multiple` (the host's share of the data x fsdp devices)."""
    row_len: int
    micro_batches: int = 1
    row_multiple: int = 1


def sft_batches(examples: Sequence[Encoded], *, batch_size: int, pad_id: int, **kwargs: Any) -> Batches:
    """Batches of `batches.sft_batch` layout, or packed rows (`packing=Packing(...)`).

    Options (all three builders): buckets=DEFAULT_BUCKETS, seed=0, shuffle=True,
    drop_remainder=True, num_epochs=1 (None streams forever), process_index / process_count
    (default jax.process_index() / jax.process_count()); the two training builders also take
    packing (None: one row per example). A packed batch holds the same examples as the
    unpacked one.
    """
    return _batches(examples, [e.length for e in examples], "sft", batch_size, pad_id, **kwargs)


def preference_batches(examples: Sequence[EncodedPair], *, batch_size: int, pad_id: int,
                       **kwargs: Any) -> Batches:
    """Batches of `batches.preference_batch` layout; options as for `sft_batches` (packed: each
    pair one group [prompt | chosen | rejected])."""
    return _batches(examples, [e.length for e in examples], "preference", batch_size, pad_id,
                    **kwargs)


def prompt_batches(examples: Sequence[Encoded | EncodedPair], *, batch_size: int, pad_id: int,
                   **kwargs: Any) -> Batches:
    """Left-padded prompt batches for sampling, in input order by default (shuffle=False,
    drop_remainder=False); `index` maps rows back to `examples`."""
    kwargs = {"shuffle": False, "drop_remainder": False, **kwargs}
    return _batches(examples, [len(e.prompt_ids) for e in examples], "prompt", batch_size,
                    pad_id, **kwargs)


def classification_batches(examples: Sequence[EncodedText], *, batch_size: int, pad_id: int,
                           **kwargs: Any) -> Batches:
    """Batches of `batches.classification_batch` layout (texts and their labels); options as
    for `sft_batches`."""
    return _batches(examples, [e.length for e in examples], "classification", batch_size, pad_id,
                    **kwargs)


# Every layout is collated from (examples or None, seq_len, pad_id, global example indices).
_COLLATE: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "sft": lambda items, seq_len, pad, rows: sft_batch(items, seq_len, pad, index=rows),
    "preference": lambda items, seq_len, pad, rows: preference_batch(items, seq_len, pad, index=rows),
    "prompt": lambda items, seq_len, pad, rows: prompt_batch(items, seq_len, pad, index=rows),
    "classification": lambda items, seq_len, pad, rows: classification_batch(items, seq_len, pad,
                                                                            index=rows),
}


def _batches(examples: Sequence[Any], lengths: Sequence[int], kind: str,
             batch_size: int, pad_id: int, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
             seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
             num_epochs: int | None = 1, process_index: int | None = None,
             process_count: int | None = None, packing: Packing | None = None) -> Batches:
    host, hosts = _host(process_index, process_count)
    if batch_size <= 0 or batch_size % hosts:
        raise UserError(f"batch size {batch_size} must be a positive multiple of the process "
                        f"count {hosts}; set the global batch size")
    if lengths and max(lengths) > max(buckets):
        bucket_length(max(lengths), buckets)  # raises with the fix
    source = _BatchSource(examples, np.asarray(lengths, np.int64), kind, batch_size, pad_id,
                          tuple(sorted(buckets)), seed, shuffle, drop_remainder, num_epochs, host,
                          hosts, packing)
    if source.per_epoch == 0:
        raise UserError(f"{len(examples)} examples make no batch of {batch_size} with "
                        "drop_remainder=True; lower the batch size or pass drop_remainder=False")
    return Batches(grain.MapDataset.source(source), source.per_epoch, source.fingerprint(), source)


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: the data layer needs jax just for the defaults
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchSource:
    """grain random-access source: item k is the host-local slice of global batch k."""

    examples: Sequence[Any]
    lengths: np.ndarray
    kind: str  # a key of _COLLATE
    batch_size: int
    pad_id: int
    buckets: tuple[int, ...]
    seed: int
    shuffle: bool
    drop_remainder: bool
    num_epochs: int | None
    host: int
    hosts: int
    packing: Packing | None = None

    @functools.cached_property
    def per_epoch(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    @property
    def packed(self) -> bool:
        return self.packing is not None and self.kind in ("sft", "preference")

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range [0, {len(self)})")
        epoch, j = divmod(int(k), self.per_epoch)
        rows = self._plan(epoch)[j]
        local = self.batch_size // self.hosts
        mine = rows[self.host * local:(self.host + 1) * local]
        items = [self.examples[i] if i >= 0 else None for i in mine]
        if self.packed:
            p = self.packing
            rows, scored = self._packed_needs(epoch)
            return packed_batch(items, p.row_len, self.pad_id, micro_batches=p.micro_batches,
                                row_multiple=p.row_multiple, min_rows=rows, min_scored=scored,
                                index=mine, owner_offset=self.host * (local // p.micro_batches))
        return _COLLATE[self.kind](items, self._bucket(rows), self.pad_id, mine)

    def shapes(self, epoch: int) -> list[tuple[int, int]]:
        plan = self._plan(epoch)
        if self.packed:
            rows = round_up(self._packed_needs(epoch)[0], self.packing.row_multiple)
            return [(rows * self.packing.micro_batches * self.hosts, self.packing.row_len)] * len(plan)
        return [(self.batch_size, self._bucket(rows)) for rows in plan]

    def _bucket(self, rows: np.ndarray) -> int:
        """The padded length of a planned batch (row indices, -1 for padding examples): the
        bucket of its longest example."""
        return bucket_length(int(self.lengths[rows[rows >= 0]].max()), self.buckets)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the source lives as long as its pipeline
    def _packed_needs(self, epoch: int) -> tuple[int, int]:
        """(rows, scored tokens per row) of every packed batch of the epoch: the most any batch
        (any host's slice) needs, so one program serves the epoch (another row count or scored
        width would compile another: each a full training step, GiBs while it compiles)."""
        p, local = self.packing, self.batch_size // self.hosts
        rows, scored = 1, 1
        for plan_rows in self._plan(epoch):
            for h in range(self.hosts):
                items = [self.examples[i] if i >= 0 else None
                         for i in plan_rows[h * local:(h + 1) * local]]
                r, q = packed_needs(items, p.row_len, p.micro_batches)
                rows, scored = max(rows, r), max(scored, q)
        return rows, scored

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the source lives as long as its pipeline
    def _plan(self, epoch: int) -> np.ndarray:
        return plan_epoch(self.lengths, self.batch_size, self.buckets, seed=self.seed, epoch=epoch,
                          shuffle=self.shuffle, drop_remainder=self.drop_remainder)

    def fingerprint(self) -> str:
        settings = [self.lengths.tolist(), self.kind, self.batch_size, self.buckets,
                    self.seed, self.shuffle, self.drop_remainder, self.hosts]
        if self.packing is not None:
            settings.append(dataclasses.astuple(self.packing))
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
