"""Seeded dialogue-level splits (the paper splits JPersonaChat 8:1:1 at random)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def split_dialogues(items: Sequence[T], ratios: Sequence[float] = (8, 1, 1),
                    seed: int = 0) -> tuple[list[T], ...]:
    """Splits records (or whole dialogues) so that no dialogue lands in two splits.

    Items with a `dialogue_id` attribute (PersonaTurn, SpcConversation) are grouped by it; any other
    item is a dialogue of its own. Dialogues are assigned by a seeded permutation, split i getting
    round(n * cumsum(ratios)[i] / sum(ratios)) - (the same for i-1) dialogues; within a split the
    items keep their input order. Returns one list per ratio.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.ndim != 1 or len(ratios) == 0 or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"ratios {ratios.tolist()} must be non-negative with a positive sum, "
                         "e.g. (8, 1, 1)")
    keys = [_dialogue_key(item, i) for i, item in enumerate(items)]
    unique = list(dict.fromkeys(keys))
    bounds = np.rint(np.cumsum(ratios) / ratios.sum() * len(unique)).astype(int)
    order = np.random.default_rng(seed).permutation(len(unique))
    split_of = {unique[j]: int(np.searchsorted(bounds, rank, side="right"))
                for rank, j in enumerate(order)}
    splits: tuple[list[T], ...] = tuple([] for _ in ratios)
    for key, item in zip(keys, items):
        splits[split_of[key]].append(item)
    return splits


def _dialogue_key(item: Any, index: int) -> Any:
    dialogue_id = getattr(item, "dialogue_id", None)
    return ("id", dialogue_id) if dialogue_id is not None else ("index", index)
