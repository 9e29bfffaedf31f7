"""NLI pairs: reading them, writing them, and tokenizing them for a sequence classifier.

Two layouts are read, told apart per record:

- Dialogue NLI (Welleck et al., 2019), as released in `dialogue_nli_{train,dev,test}.jsonl`:
  despite the name each file is ONE JSON array of objects (ParlAI reads it with `json.load`);
  JSON lines are accepted too. Fields: `sentence1`, `sentence2`, `label` ∈ {positive, neutral,
  negative}, plus `dtype`, `id`, `triple1`, `triple2` (ignored here).
- Plain JSONL: `premise`, `hypothesis`, `label` ∈ {entailment, neutral, contradiction} (other
  fields, e.g. the substitute set's `rule` and `dialogue_id`, are carried along but not used).

Labels are kept by their canonical names (NLI_LABELS); positive/negative are DNLI's names for
entailment/contradiction. A bad record raises `DataFormatError` naming file, line, value and fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pdpo_jax.config.schema import NLI_LABELS
from pdpo_jax.data.batches import EncodedText
from pdpo_jax.data.records import DataFormatError
from pdpo_jax.data.textio import json_lines, read_text, require_str
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_jsonl_atomic

_ALIASES = {"entailment": "entailment", "entail": "entailment", "entails": "entailment",
            "positive": "entailment", "neutral": "neutral", "contradiction": "contradiction",
            "contradict": "contradiction", "contradicts": "contradiction", "negative": "contradiction"}


@dataclasses.dataclass(frozen=True)
class NliPair:
    """premise, hypothesis and the canonical label (one of NLI_LABELS); `extra` holds any other
    fields of the record (provenance), written back by `write_nli_jsonl`."""

    premise: str
    hypothesis: str
    label: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def canonical_label(name: Any) -> str | None:
    """'entailment' | 'neutral' | 'contradiction' for any of their usual spellings (DNLI's
    positive/negative, MNLI's ENTAILMENT, …); None for anything else."""
    return _ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def read_nli(path: str | os.PathLike) -> list[NliPair]:
    """The pairs of a DNLI file (a JSON array or JSON lines) or a premise/hypothesis JSONL."""
    return [_pair(path, line, obj) for line, obj in _records(path)]


def write_nli_jsonl(path: str | os.PathLike, pairs: Sequence[NliPair]) -> pathlib.Path:
    """premise/hypothesis/label JSONL (extra fields after them), written atomically."""
    return write_jsonl_atomic(path, ({"premise": p.premise, "hypothesis": p.hypothesis,
                                      "label": p.label, **p.extra} for p in pairs))


def _records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    text = read_text(path)
    if text.lstrip()[:1] != "[":
        yield from json_lines(path)
        return
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    while True:  # the array's elements one by one, so each error names its line
        at = _skip(text, at)
        if text[at:at + 1] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"not JSON ({e.msg} at column {e.colno})",
                                  "write a JSON array of objects, or one JSON object per line") from None
        line = text.count("\n", 0, at) + 1
        if not isinstance(obj, dict):
            raise DataFormatError(path, line, f"expected a JSON object, got {type(obj).__name__}",
                                  "write a JSON array of objects, or one JSON object per line")
        yield line, obj
        at = _skip(text, end)
        if text[at:at + 1] == ",":
            at += 1
        elif text[at:at + 1] != "]":
            raise DataFormatError(path, text.count("\n", 0, at) + 1, "expected ',' or ']' after "
                                  "an array element", "write a JSON array of objects")


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _pair(path: Any, line: int, obj: dict[str, Any]) -> NliPair:
    if "sentence1" in obj or "sentence2" in obj:
        first, second = "sentence1", "sentence2"
    elif "premise" in obj or "hypothesis" in obj:
        first, second = "premise", "hypothesis"
    else:
        raise DataFormatError(path, line, f"record has fields {sorted(obj)[:8]}, neither "
                              "sentence1/sentence2 nor premise/hypothesis",
                              "use the Dialogue NLI layout or premise/hypothesis/label JSONL")
    premise, hypothesis = require_str(path, line, obj, first), require_str(path, line, obj, second)
    if "label" not in obj:
        raise DataFormatError(path, line, "field 'label' is missing", "give every pair a label")
    label = canonical_label(obj["label"])
    if label is None:
        raise DataFormatError(path, line, f"unknown label {obj['label']!r}",
                              "use positive/neutral/negative (Dialogue NLI) or "
                              "entailment/neutral/contradiction")
    extra = {k: v for k, v in obj.items() if k not in (first, second, "label")}
    return NliPair(premise, hypothesis, label, extra)


def label_index(labels: Sequence[str]) -> dict[str, int]:
    """Canonical label → output index of a classifier whose outputs are named `labels`."""
    index = {canonical_label(name): i for i, name in enumerate(labels)}
    missing = [name for name in NLI_LABELS if name not in index]
    if missing:
        raise UserError(f"classifier labels {list(labels)} do not name {missing}; order the "
                        f"outputs as a permutation of {list(NLI_LABELS)}")
    return index


def load_tokenizer(path: str | os.PathLike, key: str = "rl.reward.tokenizer"):
    """An HF tokenizer folder; a folder holding only a WordPiece `vocab.txt` (e.g. BERT uncased)
    loads as an uncased BERT tokenizer. `key` names the setting in errors."""
    import transformers
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}: {folder} is not a folder; set it to an HF tokenizer folder "
                        "(or one holding a BERT vocab.txt)")
    if (folder / "vocab.txt").is_file() and not any(
            (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return transformers.BertTokenizerFast.from_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def encode_texts(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_length: int,
                 labels: Sequence[int] | None = None, token_types: bool = True) -> list[EncodedText]:
    """Tokenizes (premise, hypothesis) pairs as the tokenizer joins pairs ([CLS] a [SEP] b
    [SEP] for BERT, <s> a </s></s> b </s> for RoBERTa), longest side cut first to max_length.
    token_types=False: all segment ids 0 (models with one token type)."""
    if not pairs:
        return []
    enc = tokenizer([p for p, _ in pairs], [h for _, h in pairs], truncation=True,
                    max_length=max_length, return_token_type_ids=True)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    labels = [-1] * len(pairs) if labels is None else labels
    return [EncodedText(np.asarray(ids, np.int32),
                        np.asarray(t if token_types else [0] * len(ids), np.int32), int(label))
            for ids, t, label in zip(enc["input_ids"], types, labels, strict=True)]


def encode_nli(tokenizer: Any, pairs: Sequence[NliPair], labels: Sequence[str], *, max_length: int,
               token_types: bool = True) -> list[EncodedText]:
    """`encode_texts` of NLI pairs, each labelled with its index among `labels`."""
    index = label_index(labels)
    return encode_texts(tokenizer, [(p.premise, p.hypothesis) for p in pairs], max_length=max_length,
                        labels=[index[p.label] for p in pairs], token_types=token_types)
