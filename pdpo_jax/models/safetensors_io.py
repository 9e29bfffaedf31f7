"""Lazy safetensors reading (memory-mapped, tensor by tensor) and streaming writing.

Our own ~100 lines instead of `safetensors.numpy`, because that backend has no bfloat16 and
loads whole files; here a tensor is a view into a memory map until it is sliced and converted.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from pdpo_jax.errors import UserError
from pdpo_jax.fileio import atomic_path, write_json_atomic

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class TensorFiles:
    """All tensors of a checkpoint folder (one file or sharded with an index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index with a 'weight_map' ({e}); "
                                "re-export the checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise UserError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; pass a folder "
                            "written by save_pretrained (or allow_pickle=True for pytorch_model.bin)")
        self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise UserError(f"{index}: names shard {name!r}, which is missing from {self.folder}")
            header, data_start = read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._where[key] = (path, info, data_start)

    def keys(self) -> set[str]:
        return set(self._where)

    def file_of(self, key: str) -> pathlib.Path:
        return self._where[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until it is used)."""
        path, info, data_start = self._where[key]
        if info["dtype"] not in DTYPES:
            raise UserError(f"{path}: tensor {key!r} has dtype {info['dtype']!r}, which is not supported")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise UserError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} "
                            f"{info['dtype']}; the file is corrupt")
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def read_header(path: pathlib.Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def write_file(path: pathlib.Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               produce: Iterator[tuple[str, np.ndarray]]) -> None:
    """Streams tensors into a safetensors file: the header is laid out from the declared
    (name, shape, dtype) list first, then `produce` yields the arrays in that same order.
    Written to a temporary name and renamed, so a crash never leaves half a file."""
    header, offset, order = {"__metadata__": {"format": "pt"}}, 0, []
    for name, shape, dtype in tensors:
        size = np.dtype(dtype).itemsize * int(np.prod(shape))
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        order.append((name, tuple(shape), np.dtype(dtype)))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (got_name, array) in zip(order, produce, strict=True):
            if got_name != name or array.shape != shape or array.dtype != dtype:
                raise RuntimeError(f"writer expected {name} {shape} {dtype}, got "
                                   f"{got_name} {array.shape} {array.dtype}")
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())


Declared = tuple[str, tuple[int, ...], np.dtype]


def write_sharded(folder: pathlib.Path, groups: list[list[Declared]],
                  produce: Callable[[int], Iterator[tuple[str, np.ndarray]]],
                  max_shard_bytes: int) -> None:
    """Writes a checkpoint's tensors as model.safetensors, or as numbered shards with an index
    once they exceed `max_shard_bytes` (a stale file of the other layout is removed).

    groups: the declared tensors, in groups that stay in one shard (a parameter's layers);
    produce(g): yields (name, array) for group g's tensors, in order."""
    shards, size = [[]], 0
    for g, group in enumerate(groups):
        nbytes = sum(np.dtype(d).itemsize * int(np.prod(s)) for _, s, d in group)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        declared = [t for g in shard for t in groups[g]]
        write_file(folder / name, declared, (x for g in shard for x in produce(g)))
        for tname, shape, dtype in declared:
            weight_map[tname] = name
            total += np.dtype(dtype).itemsize * int(np.prod(shape))
    if len(shards) > 1:
        write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                                "weight_map": weight_map}, indent=2)
    (folder / (INDEX_FILE if len(shards) == 1 else SINGLE_FILE)).unlink(missing_ok=True)
