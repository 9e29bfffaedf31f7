"""Dialogue-NLI evaluation set reader (Welleck et al., 2019): persona-consistency ranking.

Files `valid_{attributes,havenot,likedislike}.jsonl[.gz]`, one JSON object per line with `persona`,
`prefix` (history, oldest first), `eval_labels` ([gold]), `triple`, `relevant_persona_sentence` and
`candidates` {label: [gold], similar: [...], rand: [...], neg: [...]}. The dialogues come mostly from
PersonaChat valid, so this set is for evaluation only.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pdpo_jax.data.records import DNLI_CATEGORIES, DNLI_GROUPS, DataFormatError, DnliExample
from pdpo_jax.data.textio import dataset_name, json_lines, require_persona, string_list


def read_dnli(path: str | os.PathLike, group: str | None = None) -> list[DnliExample]:
    """The examples of one DNLI eval file; `group` defaults to the one named in the file name."""
    group = group or _group_from_name(path)
    return [_example(path, number, f"{group}/{i}", group, obj)
            for i, (number, obj) in enumerate(json_lines(path))]


def read_dnli_files(paths: Sequence[str | os.PathLike]) -> list[DnliExample]:
    """All examples of several DNLI files, file by file."""
    return [example for path in paths for example in read_dnli(path)]


def _group_from_name(path: str | os.PathLike) -> str:
    name = dataset_name(path)
    for group in DNLI_GROUPS:
        if name.endswith(group):
            return group
    raise DataFormatError(path, None, f"cannot tell the DNLI group from the file name {name!r}",
                          f"pass group= one of {DNLI_GROUPS} or name the file valid_<group>.jsonl")


def _example(path: Any, line: int, example_id: str, group: str, obj: dict[str, Any]) -> DnliExample:
    persona = require_persona(path, line, obj.get("persona"))
    history = string_list(path, line, obj.get("prefix"), "prefix")
    cands = obj.get("candidates")
    if not isinstance(cands, dict) or set(cands) != set(DNLI_CATEGORIES):
        raise DataFormatError(path, line, f"'candidates' keys {sorted(cands or ())} are not "
                              f"{sorted(DNLI_CATEGORIES)}", "use the DNLI eval-set layout")
    candidates = tuple((text, DNLI_CATEGORIES[key]) for key in DNLI_CATEGORIES
                       for text in string_list(path, line, cands[key], f"candidates.{key}"))
    labels = string_list(path, line, obj.get("eval_labels"), "eval_labels")
    if len(labels) != 1 or tuple(cands["label"]) != labels:
        raise DataFormatError(path, line, f"eval_labels {labels} differ from candidates.label "
                              f"{cands['label']}", "the gold response must be the single label candidate")
    return DnliExample(example_id=example_id, group=group, persona=persona, history=history,
                       gold=labels[0], candidates=candidates,
                       triple=string_list(path, line, obj.get("triple", []), "triple"),
                       relevant_persona_sentence=str(obj.get("relevant_persona_sentence", "")))
