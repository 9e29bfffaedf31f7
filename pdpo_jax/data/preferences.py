"""Preference-pair JSONL: what the negatives stage writes and the DPO stage reads.

One pair per line: `persona` (list of str), `history` (list of str, oldest first, last turn the
partner's), `chosen` and `rejected` (str), optional `id`; every other key (e.g. the trl-style
rendered `prompt`, the swapped persona, sampler settings) is kept as metadata. The DPO pipeline
re-tokenizes from persona/history/chosen/rejected with `encode_pair`, never from `prompt`.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable

from pdpo_jax.data.records import PreferencePair
from pdpo_jax.data.textio import dataset_name, json_lines, require_persona, require_str, string_list

_FIELDS = ("persona", "history", "chosen", "rejected", "id")


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Every pair of a preference JSONL file (plain or gzip), in file order."""
    name, pairs = dataset_name(path), []
    for index, (line, obj) in enumerate(json_lines(path)):
        pairs.append(PreferencePair(
            persona=require_persona(path, line, obj.get("persona")),
            history=string_list(path, line, obj.get("history"), "history"),
            chosen=require_str(path, line, obj, "chosen"),
            rejected=require_str(path, line, obj, "rejected"),
            pair_id=str(obj.get("id", f"{name}/{index}")),
            metadata={k: v for k, v in obj.items() if k not in _FIELDS}))
    return pairs


def write_preference_jsonl(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> int:
    """Writes pairs (gzip when the name ends in .gz); returns how many. Inverse of the reader."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for pair in pairs:
            obj = {**pair.metadata, "id": pair.pair_id, "persona": list(pair.persona),
                   "history": list(pair.history), "chosen": pair.chosen, "rejected": pair.rejected}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            count += 1
    return count
