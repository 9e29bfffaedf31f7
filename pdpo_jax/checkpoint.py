"""Resumable training checkpoints (orbax) and atomic export of the selected model.

Two things are kept apart on purpose: `latest` is the full train state (params, optimizer,
step, data-iterator position, best metric so far) for resuming; the *selected* model (lowest
dev loss for SFT, highest dev reward accuracy for DPO) is exported as an HF folder the moment
it improves, so model selection needs no second pass and survives a crash.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from pdpo_jax.models import save_pretrained


class Checkpointer:
    """Saves/restores {state, data iterator state, meta} under `directory`, keeping `keep`."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state, expected_meta: dict):
        """(state, data_state, meta) of the latest step, placed like `abstract_state`.

        `expected_meta["model"]` must equal what was saved: a checkpoint directory written for
        another model is refused before anything is loaded."""
        step = self.latest_step()
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("model") != expected_meta.get("model"):
            raise ValueError(f"{self.directory}: checkpoint step {step} was written for model "
                             f"{meta.get('model')}, but this run builds {expected_meta.get('model')}; "
                             "use a new run.out_dir or delete that directory")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"], meta

    def close(self):
        self._manager.close()


def export_atomically(model, folder: str | pathlib.Path, *, tokenizer=None, extra: dict | None = None):
    """save_pretrained into `folder.tmp`, then swap it in: `folder` is always whole."""
    folder = pathlib.Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    if extra is not None:
        (tmp / "pdpo_selection.json").write_text(json.dumps(extra, indent=2) + "\n")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def exporter(graphdef, folder: str | pathlib.Path, *, tokenizer=None):
    """export(params, metrics): the model `export_atomically` into `folder` (with the tokenizer
    and the selection metrics); with several processes each joins the gather, process 0 writes."""
    def export(params, metrics):
        if jax.process_count() > 1:  # params span hosts: every process joins the gather
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:  # one writer: the folder is shared
            export_atomically(nnx.merge(graphdef, params), folder, tokenizer=tokenizer,
                              extra={k: float(np.asarray(v)) for k, v in metrics.items()})
        if jax.process_count() > 1:  # nobody reads `folder` before it is whole
            multihost_utils.sync_global_devices(f"export {folder}")
    return export
