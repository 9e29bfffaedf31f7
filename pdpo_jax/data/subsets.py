"""Seeded record subsets: `data.max_<split>_records` and `negatives.max_records` draw, never cut.

A subset is a uniform sample of records without replacement, returned in file order. Records,
not whole conversations: the first 2,000 records of Synthetic-Persona-Chat's test split are 74
conversations (their 148 personas), while 2,000 records drawn uniformly touch ~835 of its 966
conversations, so a small run sees as many personas and as many turn positions (short
and long histories) as the file holds. Records of one conversation share a persona and
history, so a subset of N records holds fewer than N independent dialogues either way.

Every draw has its own stream of the run's seed (`STREAMS`), so the SFT subset does not move
when the negatives subset changes size, and a draw is the same on every host and every rerun.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# One random stream per draw: seeding each draw with (run.seed, stream) keeps them independent.
STREAMS = {"train": 0, "dev": 1, "negatives": 2}


def sample_indices(population: Sequence[int] | int, n: int | None, seed: int,
                   stream: str) -> np.ndarray:
    """n indices drawn uniformly without replacement from `population` (a list of indices,
    or range(population)), sorted; all of them when n is None or not smaller."""
    pool = np.arange(population) if isinstance(population, int) else np.asarray(population, int)
    pool = np.sort(pool)
    if n is None or n >= len(pool):
        return pool
    rng = np.random.default_rng([seed, STREAMS[stream]])
    return np.sort(rng.choice(pool, size=n, replace=False))


def disjoint_indices(total: int, used: Sequence[int], n: int | None, seed: int,
                     stream: str) -> np.ndarray:
    """n of the indices of range(total) not in `used`, drawn as `sample_indices` draws."""
    rest = np.setdiff1d(np.arange(total), np.asarray(used, int))
    return sample_indices(rest, n, seed, stream)
