"""Collating encodings into numpy batches (the layouts every step and sampler takes).

Training batches are RIGHT-padded; masks come from lengths, never from `token != pad`, so an EOS
that equals the pad id still counts in the loss. A `None` example is a fully-masked padding row.

SFT, one row per example (B rows, T = the batch's bucket length):
    tokens          int32[B, T]  prompt ids, response ids, then pad
    positions       int32[B, T]  0..len-1 on real tokens, 0 on padding
    attention_mask  bool[B, T]   True on real tokens
    loss_mask       bool[B, T]   True iff tokens[b, t] is a response token (EOS included): the
                                 logits at t-1 are scored against tokens[t]
    index           int32[B]     the example's index in the pipeline's list, -1 on padding rows
Preference: the SFT layout twice, keys prefixed `chosen_` and `rejected_`, one shared T, and index.
Prompts, LEFT-padded so every row's last prompt token sits at T-1 (sampling / scoring):
    tokens int32[B, T], positions int32[B, T] (0 at the first real token, 0 on padding),
    attention_mask bool[B, T], index int32[B] (example index, -1 on padding rows)
Classification (a text or text pair and its label, e.g. NLI), RIGHT-padded:
    tokens, positions, attention_mask as for SFT; token_types int32[B, T] (segment ids, 0 on
    padding); labels int32[B] (class index, -1 on padding rows); index int32[B]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pdpo_jax.data.encode import Encoded, EncodedPair
from pdpo_jax.errors import UserError

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length, so jitted steps see only len(buckets) sequence lengths."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise UserError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}; "
                    "encode with max_total_tokens <= the largest bucket or add a bucket")


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (prompt-length and batch-size padding)."""
    return -(-n // multiple) * multiple


def sft_batch(examples: Sequence[Encoded | None], seq_len: int, pad_id: int,
              index: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-padded SFT batch of len(examples) rows and seq_len columns (layout: module doc)."""
    rows = [None if e is None else (e.prompt_ids, e.response_ids) for e in examples]
    return {**_right_padded(rows, seq_len, pad_id), "index": _index(examples, index)}


def preference_batch(examples: Sequence[EncodedPair | None], seq_len: int,
                     pad_id: int, index: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """chosen_* and rejected_* SFT layouts over one shared prompt, both seq_len long."""
    batch = {"index": _index(examples, index)}
    for side in ("chosen", "rejected"):
        rows = [None if e is None else (e.prompt_ids, getattr(e, f"{side}_ids")) for e in examples]
        batch |= {f"{side}_{k}": v for k, v in _right_padded(rows, seq_len, pad_id).items()}
    return batch


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedText:
    """A tokenized text (pair) to classify: ids int32[T] with its segment ids int32[T] and
    the class index (-1: unlabelled)."""

    ids: np.ndarray
    types: np.ndarray
    label: int = -1

    @property
    def length(self) -> int:
        return len(self.ids)


def classification_batch(examples: Sequence[EncodedText | None], seq_len: int, pad_id: int,
                         index: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-padded classification batch of len(examples) rows (layout: module doc)."""
    rows = [None if e is None else (e.ids[:0], e.ids) for e in examples]
    batch = _right_padded(rows, seq_len, pad_id, allow_empty_prompt=True)
    batch.pop("loss_mask")
    types = np.zeros_like(batch["tokens"])
    for row, e in enumerate(examples):
        if e is not None:
            types[row, :len(e.types)] = e.types
    labels = np.asarray([-1 if e is None else e.label for e in examples], np.int32)
    return {**batch, "token_types": types, "labels": labels, "index": _index(examples, index)}


def _index(examples: Sequence[object | None], index: Sequence[int] | None) -> np.ndarray:
    """int32[B]: each row's example index (default 0..B-1), -1 on padding rows."""
    if index is None:
        index = [-1 if e is None else i for i, e in enumerate(examples)]
    return np.asarray(index, np.int32).reshape(len(examples))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """Token ids → (tokens int32 [B, length], mask bool [B, length]), each prompt ending in
    the last column (the sampler's layout); None rows are all padding. length: default the
    longest prompt."""
    lengths = [0 if p is None else len(p) for p in prompts]
    length = max(lengths, default=0) if length is None else length
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, (ids, n) in enumerate(zip(prompts, lengths)):
        if n:
            _check_fits(n, length)
            tokens[row, length - n:] = ids
            mask[row, length - n:] = True
    return tokens, mask


def prompt_batch(prompts: Sequence[np.ndarray | Encoded | EncodedPair | None], seq_len: int,
                 pad_id: int, index: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompt batch; `index` (default 0..B-1, -1 for None rows) labels the rows."""
    tokens, mask = left_pad([getattr(p, "prompt_ids", p) for p in prompts], pad_id, seq_len)
    positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
    return {"tokens": tokens, "positions": positions, "attention_mask": mask,
            "index": _index(prompts, index)}


def _right_padded(rows: Sequence[tuple[np.ndarray, np.ndarray] | None], seq_len: int,
                  pad_id: int, allow_empty_prompt: bool = False) -> dict[str, np.ndarray]:
    b = len(rows)
    tokens = np.full((b, seq_len), pad_id, np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    attention = np.zeros((b, seq_len), bool)
    loss = np.zeros((b, seq_len), bool)
    for row, pair in enumerate(rows):
        if pair is None:
            continue
        prompt, response = pair
        p = len(prompt)
        if p == 0 and not allow_empty_prompt:
            raise ValueError("empty prompt: the first response token would have no logits to score it")
        n = _check_fits(p + len(response), seq_len)
        tokens[row, :p], tokens[row, p:n] = prompt, response
        positions[row, :n] = np.arange(n)
        attention[row, :n] = True
        loss[row, p:n] = True
    return {"tokens": tokens, "positions": positions, "attention_mask": attention, "loss_mask": loss}


def _check_fits(n: int, seq_len: int) -> int:
    if n > seq_len:
        raise ValueError(f"example of {n} tokens does not fit seq_len {seq_len}")
    return n
