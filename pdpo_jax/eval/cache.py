"""A persistent SQLite cache of judge answers, so a rerun or an interrupted run never pays twice.

Key: sha256 of (judge id, template hash, the exact rendered prompt). The prompt holds persona,
history and both replies in the order shown, so swapping the order is a different judgment.
Each judgment is written in its own transaction once it is final (parsed or given up as
invalid); a request that fails leaves no row. Only the thread that opened the cache writes.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sqlite3
import time
from collections.abc import Iterable

from pdpo_jax.fileio import text_hash

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    template_hash TEXT NOT NULL,
    verdict INTEGER,            -- 1, 2, 3; NULL = invalid after every retry
    answer TEXT NOT NULL,       -- the judge's last answer, explanation included
    attempts INTEGER NOT NULL,
    created REAL NOT NULL
)"""


@dataclasses.dataclass(frozen=True)
class CachedJudgment:
    verdict: int | None
    answer: str
    attempts: int


def judgment_key(judge_id: str, template_hash: str, prompt: str) -> str:
    return text_hash(judge_id, template_hash, prompt)


class JudgmentCache:
    """`get_many(keys)` → {key: CachedJudgment}; `put(...)` commits one row atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # WAL: readers (e.g. a report run) do not block the writer, and a crash mid-write
        # rolls back to the last committed judgment.
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._db:
            self._db.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedJudgment]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, CachedJudgment] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's parameter limit
            chunk = keys[start:start + 500]
            rows = self._db.execute(
                f"SELECT key, verdict, answer, attempts FROM judgments WHERE key IN "
                f"({','.join('?' * len(chunk))})", chunk)
            found.update({k: CachedJudgment(v, a, n) for k, v, a, n in rows})
        return found

    def put(self, key: str, judge_id: str, template_hash: str, verdict: int | None, answer: str,
            attempts: int) -> None:
        with self._db:  # one transaction per judgment: committed whole or not at all
            self._db.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, judge_id, template_hash, verdict, answer, attempts, time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgmentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
