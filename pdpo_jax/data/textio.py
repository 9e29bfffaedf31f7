"""Reading data files: plain or gzip, strict UTF-8, and line-numbered errors.

Files here are a few MB, so each is read whole; that lets a decoding error be reported with its
line number, and keeps the readers deterministic (no partial datasets on a bad byte).
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from pdpo_jax.data.records import DataFormatError

_GZIP_MAGIC = b"\x1f\x8b"


def read_text(path: str | os.PathLike) -> str:
    """The whole file as text; gzip is recognised by its magic bytes, not its name."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFormatError(path, None, f"corrupt gzip data ({e})",
                                  "re-download the file or decompress it by hand to check") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"bytes {raw[e.start:e.end]!r} are not UTF-8",
                              "convert the file to UTF-8 (e.g. `iconv -f cp932 -t utf-8`)") from None
    # A BOM from spreadsheet exports is not part of the first field.
    return text.removeprefix("\ufeff")


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) without the line end.

    Splits on '\\n' only: str.splitlines would also split on U+2028 and friends inside utterances.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    for number, line in numbered_lines(read_text(path)):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, number, f"not JSON ({e.msg} at column {e.colno}): "
                                  f"{line[:80]!r}", "write one JSON object per line (JSONL)") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, number, f"expected a JSON object, got {type(obj).__name__}",
                                  "write one JSON object per line (JSONL)")
        yield number, obj


def require_persona(path: Any, line: int | None, persona: Any, field: str = "persona") -> tuple[str, ...]:
    """A non-empty tuple of non-empty persona sentences, or a DataFormatError."""
    sentences = string_list(path, line, persona, field)
    sentences = tuple(s.strip() for s in sentences if s.strip())
    if not sentences:
        raise DataFormatError(path, line, f"empty {field} {persona!r}",
                              "every dialogue needs at least one persona sentence; fix or drop it")
    return sentences


def string_list(path: Any, line: int | None, value: Any, field: str) -> tuple[str, ...]:
    """`value` as a tuple of str, or a DataFormatError naming the field."""
    if not isinstance(value, Sequence) or isinstance(value, str) or \
            not all(isinstance(v, str) for v in value):
        raise DataFormatError(path, line, f"field {field!r} must be a list of strings, got "
                              f"{str(value)[:80]!r}", f"write {field} as a JSON list of strings")
    return tuple(value)


def require_str(path: Any, line: int | None, obj: dict[str, Any], field: str) -> str:
    """obj[field] as a non-empty str, or a DataFormatError naming the field."""
    value = obj.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, line, f"field {field!r} must be a non-empty string, got "
                              f"{str(value)[:80]!r}", f"add a non-empty {field!r} to every line")
    return value


def dataset_name(path: str | os.PathLike) -> str:
    """File name without .gz/.txt/.csv/.json(l): the prefix of dialogue ids."""
    name = os.path.basename(os.fspath(path))
    for suffix in (".gz", ".txt", ".csv", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name
