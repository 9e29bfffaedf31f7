"""Small file helpers shared by the eval stages: atomic JSON/JSONL writes and checkpoint fingerprints.

Every stage output is written to `<name>.tmp` and renamed into place, so an interrupted run leaves
either the old file or the new one, never half of one; a stage that finds its output (and a
matching meta file) skips the work.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> pathlib.Path:
    """Writes one JSON object per line to `path` via a temporary file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> pathlib.Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when the file is absent or unreadable (treated as not done)."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A short hash of the names, sizes and mtimes of a checkpoint's files.

    Cheap (no weights are read) and changes whenever a stage re-exports the checkpoint, so cached
    scores and responses of an older model are never reused for a newer one.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; check eval.checkpoints")
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def text_hash(*parts: str) -> str:
    """sha256 of the parts, joined unambiguously (length-prefixed)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()
