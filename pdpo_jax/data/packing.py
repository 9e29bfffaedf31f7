"""Several sequences in one row, kept apart by segment ids (`models.attention.segment_id`: a
group is one record, or one prompt with its continuations; part 0 is the group's prefix, which
its parts see; part p >= 1 sees itself and the prefix; groups never see each other), each with
positions counted as in a row of its own.

  pack_continuations  one prompt and as many of its continuations as fit a row: Dialogue-NLI
                      scores ~33 candidates of one prompt in ~700 tokens instead of ~7,000;
  packed_sft_batch    training records side by side (each its own group), first-fit
                      decreasing into rows of one length: little padding, the same loss;
  packed_preference_batch  DPO pairs, each a group [prompt | chosen | rejected], likewise.

Scored tokens come with the column that predicts them (`pred`), their own column (`target`) and
their owner (the example's slot in the batch; for pairs also the side), so a step sums
log-probs per example exactly as an unpacked batch does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pdpo_jax.data.batches import round_up
from pdpo_jax.data.encode import Encoded, EncodedPair
from pdpo_jax.models.attention import SEGMENT_PARTS, segment_id

SCORED_MULTIPLE = 64  # scored tokens per row round up to a multiple of this (few shapes)


@dataclasses.dataclass
class PackedRow:
    """One row, and for each scored token: the column that predicts it (`pred`), its column
    (`target`), which sequence it belongs to (`owner`) and which side (`side`: 0, or 1 for a
    pair's rejected reply)."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    segments: list[int] = dataclasses.field(default_factory=list)
    pred: list[int] = dataclasses.field(default_factory=list)
    target: list[int] = dataclasses.field(default_factory=list)
    owner: list[int] = dataclasses.field(default_factory=list)
    side: list[int] = dataclasses.field(default_factory=list)
    groups: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, ids: Sequence[int], positions: Sequence[int], segment: int) -> int:
        """Appends tokens of one segment; returns the column of the first."""
        start = len(self.tokens)
        self.tokens += list(ids)
        self.positions += list(positions)
        self.segments += [segment] * len(ids)
        return start

    def score(self, start: int, n: int, first_pred: int, owner: int, side: int = 0) -> None:
        """Scores the n tokens at columns start…: the first predicted from `first_pred`, the
        others from the column before them."""
        self.pred += [first_pred] + list(range(start, start + n - 1))
        self.target += list(range(start, start + n))
        self.owner += [owner] * n
        self.side += [side] * n


def pack_continuations(prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                       max_len: int) -> list[PackedRow]:
    """Rows [prompt | c_a | c_b | …] of at most `max_len` tokens holding every continuation once,
    in order; every row repeats the prompt (group 1, part 0; continuation j a part of its own).
    A continuation's first token is predicted from the prompt's last column."""
    P = len(prompt)
    if P == 0:
        raise ValueError("empty prompt: a continuation's first token would have no logits")
    rows: list[PackedRow] = []
    for j, ids in enumerate(continuations):
        if P + len(ids) > max_len:
            raise ValueError(f"a {P}-token prompt and a {len(ids)}-token continuation do not fit "
                             f"a row of {max_len} tokens")
        part = rows[-1].segments[-1] % SEGMENT_PARTS + 1 if rows else SEGMENT_PARTS
        if not rows or len(rows[-1]) + len(ids) > max_len or part >= SEGMENT_PARTS:
            rows.append(PackedRow())
            rows[-1].add(prompt, range(P), segment_id(1, 0))
            part = 1
        row = rows[-1]
        start = row.add(ids, range(P, P + len(ids)), segment_id(1, part))
        row.score(start, len(ids), P - 1, owner=j)
    return rows


def first_fit(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices grouped into rows whose lengths sum to at most row_len: first-fit, longest first
    (ties in index order), so the grouping is deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_len:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a packed row of "
                             f"{row_len}; raise data.pack_length")
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def packed_length(example: Encoded | EncodedPair) -> int:
    """Tokens an example takes in a packed row (a pair: prompt + chosen + rejected)."""
    if isinstance(example, EncodedPair):
        return len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)
    return example.length


def _sft_row(examples: Sequence[tuple[int, Encoded]]) -> PackedRow:
    row = PackedRow()
    for group, (slot, e) in enumerate(examples, start=1):
        P, R = len(e.prompt_ids), len(e.response_ids)
        start = row.add(e.tokens, range(P + R), segment_id(group, 0))
        row.score(start + P, R, start + P - 1, owner=slot)
    return row


def _pair_row(examples: Sequence[tuple[int, EncodedPair]]) -> PackedRow:
    row = PackedRow()
    for group, (slot, e) in enumerate(examples, start=1):
        P = len(e.prompt_ids)
        start = row.add(e.prompt_ids, range(P), segment_id(group, 0))
        for side, ids in enumerate((e.chosen_ids, e.rejected_ids)):
            at = row.add(ids, range(P, P + len(ids)), segment_id(group, side + 1))
            row.score(at, len(ids), start + P - 1, owner=slot, side=side)
    return row


def packed_batch(examples: Sequence[Encoded | EncodedPair | None], row_len: int, pad_id: int,
                 *, micro_batches: int = 1, row_multiple: int = 1, min_rows: int = 1,
                 min_scored: int = 1, index: Sequence[int] | None = None,
                 owner_offset: int = 0) -> dict[str, np.ndarray]:
    """A training batch of SFT records or DPO pairs packed into rows of `row_len` tokens.

    The B examples are cut into `micro_batches` consecutive slices, each packed alone into R rows
    (R the same for all: the largest need or `min_rows`, rounded up to `row_multiple`), so row
    arrays are [micro_batches * R, ...] and split like unpacked ones. A row's scored columns Q
    are the most any row scores, or `min_scored`, rounded up to SCORED_MULTIPLE. The array
    shapes (R and Q) are what compiles a program: a trainer passes the epoch's largest needs
    (`packed_needs`) so that one program serves the epoch.
    Keys: those of `collate_packed` ([., row_len] and [., Q]), plus `examples` bool [B] (real
    examples) and `index` int32 [B] (-1 for None, a padding example). `owner` is the example's
    slot in its micro-batch plus `owner_offset`: on host h of a multi-host run, h x the
    examples each host puts in a micro-batch, so that owners index the global micro-batch the
    hosts' arrays make together (as `examples` and `index` do).
    """
    B = len(examples)
    if B % micro_batches:
        raise ValueError(f"{B} examples do not split into {micro_batches} micro-batches")
    slices = _packed_slices(examples, row_len, micro_batches)
    rows_need, scored_need = _needs(slices)
    R = round_up(max(rows_need, min_rows), row_multiple)
    rows = [row for s in slices for row in s + [None] * (R - len(s))]
    Q = round_up(max(scored_need, min_scored), SCORED_MULTIPLE)
    out = collate_packed(rows, row_len, min(Q, row_len), pad_id)
    out["owner"] = np.where(out["owner"] >= 0, out["owner"] + owner_offset, -1).astype(np.int32)
    ids = [-1 if e is None else i for i, e in enumerate(examples)] if index is None else index
    out["index"] = np.asarray(ids, np.int32).reshape(B)
    out["examples"] = out["index"] >= 0
    return out


def packed_needs(examples: Sequence[Encoded | EncodedPair | None], row_len: int,
                 micro_batches: int = 1) -> tuple[int, int]:
    """(rows, scored tokens per row) `packed_batch` needs for these examples, before rounding."""
    return _needs(_packed_slices(examples, row_len, micro_batches))


def _needs(slices: list[list[PackedRow]]) -> tuple[int, int]:
    rows = max([len(s) for s in slices] + [1])
    scored = max([len(r.target) for s in slices for r in s] + [1])
    return rows, scored


def _packed_slices(examples, row_len: int, micro_batches: int) -> list[list[PackedRow]]:
    b = len(examples) // micro_batches
    pair = any(isinstance(e, EncodedPair) for e in examples)
    make = _pair_row if pair else _sft_row
    slices = []
    for m in range(micro_batches):
        real = [(slot, e) for slot, e in enumerate(examples[m * b:(m + 1) * b]) if e is not None]
        groups = first_fit([packed_length(e) for _, e in real], row_len)
        slices.append([make([real[i] for i in sorted(g)]) for g in groups])
    return slices


def collate_packed(rows: Sequence[PackedRow | None], seq_len: int, scored: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays of packed rows (None: an all-padding row):
        tokens, positions, segments  int32 [B, seq_len]   (segment 0 on padding)
        pred, target                 int32 [B, scored]    (0 on padding)
        valid                        bool  [B, scored]
        owner                        int32 [B, scored]    (-1 on padding)
        side                         int32 [B, scored]"""
    B = len(rows)
    out = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "positions", "segments")}
    out["tokens"][:] = pad_id
    out |= {k: np.zeros((B, scored), np.int32) for k in ("pred", "target", "side")}
    out["valid"] = np.zeros((B, scored), bool)
    out["owner"] = np.full((B, scored), -1, np.int32)
    for b, row in enumerate(rows):
        if row is None:
            continue
        if len(row) > seq_len or len(row.target) > scored:
            raise ValueError(f"a row of {len(row)} tokens and {len(row.target)} scored tokens "
                             f"does not fit [{seq_len}] / [{scored}]")
        n, q = len(row), len(row.target)
        for key in ("tokens", "positions", "segments"):
            out[key][b, :n] = getattr(row, key)
        for key in ("pred", "target", "owner", "side"):
            out[key][b, :q] = getattr(row, key)
        out["valid"][b, :q] = True
    return out
