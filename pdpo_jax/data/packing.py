"""Several sequences in one row, kept apart by segment ids (`models.attention.key_info`: 0
padding, 1 a prefix every segment of the row sees, k >= 2 a sequence that sees only itself and
that prefix), each with positions counted as in a row of its own.

`pack_continuations` puts one prompt (segment 1) and as many of its continuations as fit into a
row: Dialogue-NLI scores ~33 candidates of one prompt in ~700 tokens instead of ~7,000.
`collate_packed` lays rows out as arrays, with the columns whose outputs score each token.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SHARED = 1  # the segment id of a row's shared prefix (models.attention.SHARED_SEGMENT)


@dataclasses.dataclass
class PackedRow:
    """One row, and for each scored token: the column that predicts it (`pred`), its column
    (`target`) and which sequence it belongs to (`owner`, an index into the caller's list)."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    segments: list[int] = dataclasses.field(default_factory=list)
    pred: list[int] = dataclasses.field(default_factory=list)
    target: list[int] = dataclasses.field(default_factory=list)
    owner: list[int] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def pack_continuations(prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                       max_len: int) -> list[PackedRow]:
    """Rows [prompt | c_a | c_b | …] of at most `max_len` tokens holding every continuation once,
    in order; every row repeats the prompt. A continuation's first token is predicted from the
    prompt's last column, the others from the column before them (its own segment)."""
    P = len(prompt)
    if P == 0:
        raise ValueError("empty prompt: a continuation's first token would have no logits")
    rows: list[PackedRow] = []
    for j, ids in enumerate(continuations):
        if P + len(ids) > max_len:
            raise ValueError(f"a {P}-token prompt and a {len(ids)}-token continuation do not fit "
                             f"a row of {max_len} tokens")
        if not rows or len(rows[-1]) + len(ids) > max_len:
            rows.append(PackedRow(list(prompt), list(range(P)), [SHARED] * P))
        row, start, n = rows[-1], len(rows[-1]), len(ids)
        segment = max(row.segments) + 1
        row.tokens += list(ids)
        row.positions += list(range(P, P + n))
        row.segments += [segment] * n
        row.pred += [P - 1] + list(range(start, start + n - 1))
        row.target += list(range(start, start + n))
        row.owner += [j] * n
    return rows


def collate_packed(rows: Sequence[PackedRow | None], seq_len: int, scored: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays of packed rows (None: an all-padding row):
        tokens, positions, segments  int32 [B, seq_len]   (segment 0 on padding)
        pred, target                 int32 [B, scored]    (0 on padding)
        valid                        bool  [B, scored]
        owner                        int32 [B, scored]    (-1 on padding)"""
    B = len(rows)
    out = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "positions", "segments")}
    out["tokens"][:] = pad_id
    out |= {k: np.zeros((B, scored), np.int32) for k in ("pred", "target")}
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
        for key in ("pred", "target", "owner"):
            out[key][b, :q] = getattr(row, key)
        out["valid"][b, :q] = True
    return out
