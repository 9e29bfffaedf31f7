"""The CLI pipeline on a tiny model: SFT runs, exports, resumes exactly after a kill."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from pdpo_jax import pipeline
from pdpo_jax.config import load_config
from pdpo_jax.train import loop
from pdpo_jax.train.__main__ import main

TINY = ("data.max_train_records=96", "data.max_dev_records=16", "sft.batch_size=8",
        "sft.eval_every=3", "sft.max_steps=6", "sft.log_every=1")


def _cfg(tmp_path, *extra):
    return load_config("configs/tiny_sft.yaml", (f"run.out_dir={tmp_path}", *TINY, *extra))


def _final_state(run_dir):
    return ocp.StandardCheckpointer().restore((run_dir / "sft" / "ckpt" / "6" / "state").resolve())


def test_sft_exports_a_model_transformers_loads(tmp_path):
    assert main(["--config", "configs/tiny_sft.yaml", f"run.out_dir={tmp_path}", *TINY]) == 0
    best = tmp_path / "sft" / "best"
    model = transformers.AutoModelForCausalLM.from_pretrained(best)
    assert model.config.num_hidden_layers == 2
    selection = json.loads((best / "pdpo_selection.json").read_text())
    rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert selection["loss"] == min(r["eval/loss"] for r in evals)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (tmp_path / "sft" / "DONE.json").is_file()
    stats = json.loads((tmp_path / "sft" / "data_stats.json").read_text())
    assert stats["truncation"] == "truncate" and stats["max_total_tokens"] == 256
    assert stats["train"]["total"] == 96 and stats["dev"]["total"] == 16
    assert stats["train"]["kept"] + sum(stats["train"]["dropped"].values()) == 96
    # A rerun skips the finished stage.
    assert main(["--config", "configs/tiny_sft.yaml", f"run.out_dir={tmp_path}", *TINY]) == 0


def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    pipeline.run(_cfg(tmp_path / "whole"))
    calls = {"n": 0}
    real = loop.micro_batches

    def dying(batch, grad_accum):
        calls["n"] += 1
        if calls["n"] == 5:  # killed while dispatching step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(batch, grad_accum)

    monkeypatch.setattr(loop, "micro_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_cfg(tmp_path / "killed"))
    monkeypatch.setattr(loop, "micro_batches", real)
    pipeline.run(_cfg(tmp_path / "killed"))
    whole, resumed = _final_state(tmp_path / "whole"), _final_state(tmp_path / "killed")
    import jax
    jax.tree.map(np.testing.assert_array_equal, resumed, whole)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _kill_after_first_checkpoint(tmp_path)
    other = _cfg(tmp_path, "model.architecture.hidden_size=32")
    with pytest.raises(ValueError, match="was written for model"):
        pipeline.run(other)


def _kill_after_first_checkpoint(tmp_path):
    real = loop.micro_batches
    calls = {"n": 0}

    def dying(batch, grad_accum):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(batch, grad_accum)
    loop.micro_batches = dying
    try:
        pipeline.run(_cfg(tmp_path))
    finally:
        loop.micro_batches = real


def test_impossible_mesh_and_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        pipeline.run(_cfg(tmp_path, "mesh.data=3", "mesh.fsdp=1"))
    with pytest.raises(ValueError, match="unknown stages"):
        pipeline.run(_cfg(tmp_path, "run.stages=[sft, polish]"))


def test_cli_reports_config_errors(capsys):
    assert main(["--config", "configs/tiny_sft.yaml", "sft.epocs=2"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dpo_inputs(tmp_path_factory, tiny_sft_model):
    """A random tiny model (as the SFT model) and small preference files, no sampling needed."""
    import shutil

    from pdpo_jax import data as pdata
    root = tmp_path_factory.mktemp("dpo_inputs")
    shutil.copytree(tiny_sft_model, root / "sft")
    records = pdata.read_turns(pdata.default_paths().dev)[:48]
    pairs = [pdata.PreferencePair(r.persona, r.history, r.response, records[(i + 7) % 48].response, f"p{i}")
             for i, r in enumerate(records)]
    pdata.write_preference_jsonl(root / "train.jsonl", pairs[:32])
    pdata.write_preference_jsonl(root / "dev.jsonl", pairs[32:])
    return root


def _dpo_cfg(run_dir, inputs, *extra):
    arch = ("model.architecture.hidden_size=32", "model.architecture.num_hidden_layers=1",
            "model.architecture.num_attention_heads=2", "model.architecture.num_key_value_heads=1",
            "model.architecture.intermediate_size=64")
    return load_config("configs/tiny_dpo.yaml", (
        f"run.out_dir={run_dir}", "run.stages=[dpo]", f"model.checkpoint={inputs / 'sft'}", *arch,
        f"dpo.pairs={inputs / 'train.jsonl'}", f"dpo.dev_pairs={inputs / 'dev.jsonl'}",
        "dpo.batch_size=8", "dpo.eval_every=2", *extra))


def _last_eval(run_dir):
    rows = [json.loads(l) for l in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r][-1]


def test_precomputed_reference_equals_live_reference_and_is_cached(tmp_path, dpo_inputs, monkeypatch):
    pipeline.run(_dpo_cfg(tmp_path / "live", dpo_inputs))
    # model.checkpoint as the shipped configs write it, under ~ (the reference's cache key reads
    # the checkpoint's files: a DPO-only run once failed there on the unexpanded path)
    monkeypatch.setenv("HOME", str(dpo_inputs))
    pipeline.run(_dpo_cfg(tmp_path / "pre", dpo_inputs, "dpo.precompute_ref=true", "model.checkpoint=~/sft"))
    live, pre = _last_eval(tmp_path / "live"), _last_eval(tmp_path / "pre")
    stats = json.loads((tmp_path / "live" / "dpo" / "data_stats.json").read_text())
    assert (stats["train"]["total"], stats["dev"]["total"]) == (32, 16)
    assert live["step"] == pre["step"] == 4
    for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "eval/logps/chosen"):
        assert pre[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key
    cached = sorted((tmp_path / "pre" / "dpo" / "ref_logps").glob("*.npy"))
    assert [p.name.split("-")[0] for p in cached] == ["dev", "train"]
    # Same inputs again: the cache is reused, nothing is recomputed.
    from pdpo_jax.train import reference
    monkeypatch.setattr(reference, "compute", lambda *a, **k: pytest.fail("recomputed"))
    (tmp_path / "pre" / "dpo" / "DONE.json").unlink()
    import shutil
    shutil.rmtree(tmp_path / "pre" / "dpo" / "ckpt")
    pipeline.run(_dpo_cfg(tmp_path / "pre", dpo_inputs, "dpo.precompute_ref=true", "model.checkpoint=~/sft"))


def test_reference_free_dpo_stage_holds_and_scores_no_reference(tmp_path, dpo_inputs, monkeypatch):
    """dpo.loss: [simpo, sft]: the stage neither copies the reference weights nor precomputes
    reference log-probs (even with precompute_ref), and trains to the end."""
    from pdpo_jax.train import reference, stages
    monkeypatch.setattr(reference, "compute", lambda *a, **k: pytest.fail("reference scored"))
    monkeypatch.setattr(stages, "frozen_forward_params", lambda *a: pytest.fail("reference held"))
    run = tmp_path / "simpo"
    pipeline.run(_dpo_cfg(run, dpo_inputs, "dpo.loss=[simpo, sft]", "dpo.precompute_ref=true"))
    last = _last_eval(run)
    assert last["step"] == 4 and np.isfinite(last["eval/loss"])
