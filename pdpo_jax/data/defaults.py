"""The data files embedded in the repository (`<repo>/data`, see data/README.md)."""
from __future__ import annotations

import dataclasses
import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data"


@dataclasses.dataclass(frozen=True)
class DefaultPaths:
    """train: SPC test split (CC-BY 4.0), dev: SPC valid split, dnli: the three DNLI eval files."""

    train: pathlib.Path
    dev: pathlib.Path
    dnli: tuple[pathlib.Path, ...]


def default_paths(data_dir: str | pathlib.Path | None = None) -> DefaultPaths:
    """Paths of the embedded data; raises FileNotFoundError naming what is missing."""
    root = pathlib.Path(data_dir) if data_dir is not None else DATA_DIR
    spc = root / "synthetic_persona_chat"
    paths = DefaultPaths(
        train=spc / "Synthetic-Persona-Chat_test.csv.gz",
        dev=spc / "Synthetic-Persona-Chat_valid.csv.gz",
        dnli=tuple(root / "dnli_eval" / f"valid_{g}.jsonl.gz"
                   for g in ("attributes", "havenot", "likedislike")))
    missing = [str(p) for p in (paths.train, paths.dev, *paths.dnli) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"embedded data files missing: {missing}; they ship in the "
                                "repository's data/ folder (run from a git checkout)")
    return paths
