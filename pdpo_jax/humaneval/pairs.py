"""The pairs a human evaluation shows: read and validated from the judge stage's output.

`python -m pdpo_jax.train` (stage `judge`) writes `<run>/eval/judge/comparisons.jsonl`, one
comparison per line with everything the judge saw (see `pdpo_jax.eval.stages.comparison_row`).
Any JSONL with the same fields works; `verdict` (1, 2, 3 = tie, null = invalid) and `answer` are
optional, so a study without a judge needs only the pairs. Every line is checked, and a bad one
is an error naming the file, the line, the field and its value.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

from pdpo_jax.fileio import text_hash

FILE = "comparisons.jsonl"
_FIX = "fix the line or re-run the judge stage (fields: see docs/humaneval.md)"


class PairsError(ValueError):
    """A pairs file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """Comparison `id` of history `history`: the judge saw `first`'s reply as 1, `second`'s as 2.
    `dialogue` is oldest first; its last turn is the partner's, the one being answered.
    `verdict` is the judge's (1, 2, 3 = tie) or None (invalid, or no judge)."""

    id: int
    history: int
    first: str
    second: str
    persona: tuple[str, ...]
    dialogue: tuple[str, ...]
    response_first: str
    response_second: str
    verdict: int | None = None

    @property
    def models(self) -> tuple[str, str]:
        return self.first, self.second

    def shown(self, swapped: bool) -> tuple[str, str]:
        """The replies shown as 1 and 2 (swapped: the judge's second reply is shown as 1)."""
        replies = (self.response_first, self.response_second)
        return replies[::-1] if swapped else replies


def pairs_file(path: str | os.PathLike) -> pathlib.Path:
    """A pairs JSONL, a judge folder holding comparisons.jsonl, or a run folder holding
    eval/judge/comparisons.jsonl."""
    path = pathlib.Path(path)
    for candidate in (path, path / FILE, path / "eval" / "judge" / FILE):
        if candidate.is_file():
            return candidate
    raise PairsError(f"{path}: no pairs there; pass a pairs JSONL, a judge folder holding {FILE} "
                     f"or a run folder holding eval/judge/{FILE} (written by the judge stage)")


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Every pair in the file (see `pairs_file`), in file order; ids are unique."""
    path = pairs_file(path)
    pairs, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            pair = parse_line(line, f"{path}:{lineno}")
            if pair.id in seen:
                raise PairsError(f"{path}:{lineno}: field 'index' = {pair.id} repeats line "
                                 f"{seen[pair.id]}; each comparison id must be unique; {_FIX}")
            seen[pair.id] = lineno
            pairs.append(pair)
    if not pairs:
        raise PairsError(f"{path}: holds no pairs; run the judge stage first or pass another file")
    return pairs


def parse_line(line: str, where: str) -> Pair:
    """One pair from one JSON line; `where` ('file:line') prefixes every error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PairsError(f"{where}: not JSON ({e.msg} at column {e.colno}); {_FIX}") from None
    if not isinstance(row, dict):
        raise PairsError(f"{where}: expected a JSON object, got {_short(row)}; {_FIX}")
    get = _Fields(row, where)
    first, second = get.text("first"), get.text("second")
    if first == second:
        raise PairsError(f"{where}: fields 'first' and 'second' are both {first!r}; a pair "
                         f"compares two different models; {_FIX}")
    verdict = row.get("verdict")
    if verdict is not None and (type(verdict) is not int or verdict not in (1, 2, 3)):
        raise PairsError(f"{where}: field 'verdict' = {_short(verdict)}; expected 1, 2, 3 (tie) "
                         f"or null (invalid); {_FIX}")
    return Pair(get.integer("index"), get.integer("history"), first, second,
                get.texts("persona"), get.texts("dialogue"), get.text("response_first", True),
                get.text("response_second", True), verdict)


class _Fields:
    """Typed access to a row's fields; a missing or mistyped one raises a PairsError."""

    def __init__(self, row: dict, where: str):
        self.row, self.where = row, where

    def _get(self, key: str, expected: str):
        if key not in self.row:
            raise PairsError(f"{self.where}: field {key!r} missing; expected {expected}; {_FIX}")
        return self.row[key]

    def _bad(self, key: str, value, expected: str) -> PairsError:
        return PairsError(f"{self.where}: field {key!r} = {_short(value)}; expected {expected}; "
                          f"{_FIX}")

    def integer(self, key: str) -> int:
        value = self._get(key, "an integer >= 0")
        if type(value) is not int or value < 0:
            raise self._bad(key, value, "an integer >= 0")
        return value

    def text(self, key: str, empty_ok: bool = False) -> str:
        expected = "a string" if empty_ok else "a non-empty string"
        value = self._get(key, expected)
        if not isinstance(value, str) or not (empty_ok or value.strip()):
            raise self._bad(key, value, expected)
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        expected = "a non-empty list of strings"
        value = self._get(key, expected)
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            raise self._bad(key, value, expected)
        return tuple(value)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """Identifies a pair set (ids, models, texts; not the judge's verdicts, which a re-run of
    the judge may change): an annotation database belongs to one."""
    return text_hash(*(json.dumps({**dataclasses.asdict(p), "verdict": None}, ensure_ascii=False,
                                  sort_keys=True) for p in sorted(pairs, key=lambda p: p.id)))[:16]


def speaker_labels(n_turns: int, speakers: tuple[str, str]) -> list[str]:
    """The judge's rule (eval.judge.JudgeTemplate): the last turn is the partner's
    (speakers[0]) and speakers alternate backwards."""
    partner, persona_holder = speakers
    return [partner if (n_turns - 1 - j) % 2 == 0 else persona_holder for j in range(n_turns)]
