"""What every stage of one run shares (`RunContext`): the config, the run folder, the mesh and
the tokenizer, and the inputs several stages read — dialogue files and the SFT model."""
from __future__ import annotations

import dataclasses
import os
import pathlib

import transformers
from jax.sharding import Mesh

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.config import Config
from pdpo_jax.errors import UserError
from pdpo_jax.models import ModelConfig


@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares."""
    cfg: Config
    run_dir: pathlib.Path
    mesh: Mesh
    tokenizer: object

    def stage_dir(self, name: str) -> pathlib.Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dialogues(self, split: str) -> list[pdata.PersonaTurn]:
        """The `train` or `dev` records of `data.<split>` (the embedded data when unset), cut to
        `data.max_<split>_records`."""
        d = self.cfg.data
        path, limit = {"train": (d.train, d.max_train_records),
                       "dev": (d.dev, d.max_dev_records)}[split]
        return read_dialogues(path or getattr(pdata.default_paths(), split), limit,
                              key=f"data.{split}")

    def sft_model(self) -> str | None:
        """The model later stages start from: this run's selected SFT model, else model.checkpoint."""
        best = self.run_dir / "sft" / "best"
        if "sft" in self.cfg.run.stages or best.is_dir():
            if not (best / "config.json").is_file():
                raise UserError(f"{best}: no SFT model; run the `sft` stage first")
            return str(best)
        return self.cfg.model.checkpoint


def read_dialogues(path: str | os.PathLike, limit: int | None, *, key: str) -> list[pdata.PersonaTurn]:
    """The records of a dialogue file (the first `limit`); a missing or empty file is the
    user's mistake, named with its config `key`."""
    if not pathlib.Path(path).is_file():
        raise UserError(f"{key}: {path} does not exist; point {key} at a dialogue file")
    records = pdata.read_turns(path)
    if not records:
        raise UserError(f"{key}: {path} holds no dialogues; check the file (format by name: "
                        ".txt FbDialog, .csv Synthetic-Persona-Chat, .json, .jsonl)")
    return records[:limit] if limit else records


def load_tokenizer(cfg: Config, checkpoint: str | None = None):
    source = cfg.model.tokenizer or checkpoint or cfg.model.checkpoint
    if not source:
        raise UserError("model.tokenizer is not set and there is no model.checkpoint to take "
                        "it from; set model.tokenizer to a tokenizer folder")
    folder = pathlib.Path(os.path.expanduser(source))
    if not folder.is_dir():
        raise UserError(f"model.tokenizer: {folder} is not a folder; set model.tokenizer (or "
                        "model.checkpoint) to a folder holding the tokenizer files")
    return transformers.AutoTokenizer.from_pretrained(folder)


def check_tokenizer(tokenizer, model_cfg: ModelConfig, where: str) -> None:
    """A tokenizer with ids the model has no embedding for is the wrong tokenizer."""
    if len(tokenizer) > model_cfg.vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab "
                        f"is {model_cfg.vocab_size}; set model.tokenizer to the model's tokenizer")


def make_context(cfg: Config) -> RunContext:
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    run_dir = pathlib.Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(cfg, run_dir, mesh, load_tokenizer(cfg))
