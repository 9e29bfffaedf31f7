"""Files a run writes and reads back: atomic writes, JSON/JSONL, content hashes.

Every output is written to `<name>.tmp` and renamed into place, so an interrupted run leaves the
old file or the new one, never half of one; a stage that finds its output (and a matching meta
file) skips the work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

from pdpo_jax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path`; renamed onto `path` when the block ends without an
    error, removed when it raises. `suffix` keeps a writer's own extension (np.save adds .npy)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return pathlib.Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> pathlib.Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False,
                                              sort_keys=True) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> pathlib.Path:
    """One JSON object per line."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return pathlib.Path(path)


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every non-blank line of `path` as JSON; [] for a missing file when `missing_ok`."""
    path = pathlib.Path(path)
    if missing_ok and not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when the file is absent or unreadable (treated as not done)."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def text_hash(*parts: str) -> str:
    """sha256 of the parts, joined unambiguously (length-prefixed)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, *, header_only: bool = False) -> str:
    """sha256 of a file's bytes; header_only (safetensors): of its header, which names every
    tensor, shape and offset, and of its size."""
    path = pathlib.Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if header_only:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            h.update(str(path.stat().st_size).encode())
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A short hash of the names, sizes and mtimes of a checkpoint's files.

    Cheap (no weights are read) and changes whenever a stage re-exports the checkpoint, so cached
    scores and responses of an older model are never reused for a newer one.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist; check eval.checkpoints")
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model", ".gguf"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
