"""Which checkpoints an evaluation compares: `eval.checkpoints` entries resolved to HF folders."""
from __future__ import annotations

import os
import pathlib

from pdpo_jax.errors import UserError


def resolve_checkpoints(entries: tuple[str, ...] | list[str],
                        run_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """{label: HF folder} from `eval.checkpoints` entries.

    An entry is `label=folder`, a bare folder (label = its name, or its parent's name for a
    stage's `best` folder), or a stage name of this run (`sft` → <run_dir>/sft/best).
    """
    out: dict[str, pathlib.Path] = {}
    for entry in entries:
        label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        folder = pathlib.Path(path).expanduser()
        if run_dir is not None and not folder.is_dir() and (pathlib.Path(run_dir) / path / "best").is_dir():
            folder = pathlib.Path(run_dir) / path / "best"
            label = label or path
        if not (folder / "config.json").is_file():
            raise UserError(f"eval.checkpoints entry {entry!r}: {folder} is not an HF "
                            "checkpoint folder (no config.json); give a folder, "
                            "label=folder, or a finished stage name")
        label = label or (folder.parent.name if folder.name == "best" else folder.name)
        if label in out:
            raise UserError(f"eval.checkpoints: two entries are labelled {label!r}; "
                            "name them with label=folder")
        out[label] = folder
    return out
