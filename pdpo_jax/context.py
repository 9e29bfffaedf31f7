"""What every stage of one run shares (`RunContext`): the config, the run folder, the mesh and
the tokenizer, and the inputs several stages read — dialogue files and the SFT model."""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import numpy as np
import transformers
from jax.sharding import Mesh

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.config import Config
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.models import ModelConfig


@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares."""
    cfg: Config
    run_dir: pathlib.Path
    mesh: Mesh
    tokenizer: object
    _files: dict[str, list[pdata.PersonaTurn]] = dataclasses.field(default_factory=dict,
                                                                    repr=False)

    def stage_dir(self, name: str) -> pathlib.Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def split_records(self, split: str) -> list[pdata.PersonaTurn]:
        """Every record of `data.<split>` (`train` or `dev`; the embedded data when unset),
        read once per run."""
        if split not in self._files:
            path = getattr(self.cfg.data, split) or getattr(pdata.default_paths(), split)
            self._files[split] = read_dialogues(path, key=f"data.{split}")
        return self._files[split]

    def subset_indices(self, split: str) -> np.ndarray:
        """Indices into `split_records(split)` of the run's records: `data.max_<split>_records`
        drawn uniformly (seeded by run.seed; `pdpo_jax.data.subsets`), all when unset."""
        d = self.cfg.data
        limit = {"train": d.max_train_records, "dev": d.max_dev_records}[split]
        return pdata.sample_indices(len(self.split_records(split)), limit, self.cfg.run.seed, split)

    def dialogues(self, split: str) -> list[pdata.PersonaTurn]:
        """The run's `train` or `dev` records (SFT trains and selects on them), in file order."""
        records = self.split_records(split)
        return [records[i] for i in self.subset_indices(split)]

    def negative_records(self) -> list[pdata.PersonaTurn]:
        """The train records the negatives stage samples replies for: `negatives.max_records`
        of SFT's records (`negatives.records=same`) or of the others (`disjoint`), in file order."""
        neg, seed = self.cfg.negatives, self.cfg.run.seed
        records, sft = self.split_records("train"), self.subset_indices("train")
        if neg.records == "same":
            picked = pdata.sample_indices(sft, neg.max_records, seed, "negatives")
        else:
            picked = pdata.disjoint_indices(len(records), sft, neg.max_records, seed, "negatives")
            if not len(picked):
                raise UserError(f"negatives.records=disjoint: SFT uses all {len(records)} records "
                                "of data.train, none is left; set data.max_train_records lower")
        return [records[i] for i in picked]

    def write_data_stats(self, stage: str, stats: dict[str, pdata.EncodeStats],
                         **budgets: int) -> pathlib.Path:
        """<run>/<stage>/data_stats.json: each split's encoding counts (kept, dropped by reason,
        truncated, history turns dropped), the truncation mode and the token budgets."""
        path = self.stage_dir(stage) / "data_stats.json"
        if jax.process_index() == 0:  # one writer: the run folder is shared
            write_json_atomic(path, {"truncation": self.cfg.data.truncation, **budgets,
                                     **{k: dataclasses.asdict(v) for k, v in stats.items()}},
                              indent=2)
        return path

    def sft_model(self) -> str | None:
        """The model later stages start from: this run's selected SFT model, else model.checkpoint."""
        best = self.run_dir / "sft" / "best"
        if "sft" in self.cfg.run.stages or best.is_dir():
            if not (best / "config.json").is_file():
                raise UserError(f"{best}: no SFT model; run the `sft` stage first")
            return str(best)
        checkpoint = self.cfg.model.checkpoint
        return None if checkpoint is None else os.path.expanduser(checkpoint)


def read_dialogues(path: str | os.PathLike, *, key: str) -> list[pdata.PersonaTurn]:
    """Every record of a dialogue file; a missing or empty file is the user's mistake, named
    with its config `key`."""
    if not pathlib.Path(path).is_file():
        raise UserError(f"{key}: {path} does not exist; point {key} at a dialogue file")
    records = pdata.read_turns(path)
    if not records:
        raise UserError(f"{key}: {path} holds no dialogues; check the file (format by name: "
                        ".txt FbDialog, .csv Synthetic-Persona-Chat, .json, .jsonl)")
    return records


def load_tokenizer(cfg: Config, checkpoint: str | None = None):
    source = cfg.model.tokenizer or checkpoint or cfg.model.checkpoint
    if not source:
        raise UserError("model.tokenizer is not set and there is no model.checkpoint to take "
                        "it from; set model.tokenizer to a tokenizer folder")
    folder = pathlib.Path(os.path.expanduser(source))
    if not folder.is_dir():
        key = "model.tokenizer" if cfg.model.tokenizer else "model.checkpoint"
        made_by_a_run = "runs" in folder.parts  # e.g. runs/<other run>/sft/best
        raise UserError(f"{key}: {folder} is not a folder; " + (
            "it is another run's output: run the config that writes it first (see this "
            "config's header)" if made_by_a_run else
            "set model.tokenizer (or model.checkpoint) to a folder holding the tokenizer files"))
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
