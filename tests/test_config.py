"""Configs: typos and wrong types are errors that point at the fix; every shipped config builds."""
import pathlib

import jax
import pytest
from flax import nnx

from pdpo_jax.config import ConfigError, load_config
from pdpo_jax.models import build_model, config_from_hf

CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                 if not p.name.startswith("_"))  # _base files are not runnable on their own


def test_typo_suggests_nearest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sft:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sft.batch_sise'; did you mean 'batch_size'\?"):
        load_config(path)


def test_wrong_type_and_bad_literal(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dpo:\n  beta: fast\n")
    with pytest.raises(ConfigError, match=r"dpo.beta: expected float, got 'fast'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"dpo.loss: 'hinje' is not one of .*; did you mean 'hinge'\?"):
        load_config(None, ("dpo.loss=hinje",))


def test_base_file_is_overlaid(tmp_path):
    (tmp_path / "_base.yaml").write_text("sft:\n  epochs: 5\n  optimizer: {lr: 1.0e-5}\n")
    (tmp_path / "exp.yaml").write_text("base: _base.yaml\nsft:\n  optimizer: {warmup_ratio: 0.1}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.sft.epochs == 5 and cfg.sft.optimizer.lr == 1e-5 and cfg.sft.optimizer.warmup_ratio == 0.1
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_overrides_and_nested_defaults():
    cfg = load_config(None, ("dpo.optimizer.warmup_ratio=0.1", "sft.max_steps=3", "data.buckets=[64,128]"))
    assert cfg.dpo.optimizer.warmup_ratio == 0.1
    assert cfg.dpo.optimizer.lr == 1e-6 and cfg.dpo.optimizer.schedule == "linear"  # App. B
    assert cfg.sft.optimizer.lr == 1e-5 and cfg.sft.optimizer.schedule == "cosine"
    assert cfg.sft.max_steps == 3 and cfg.data.buckets == (64, 128)
    assert cfg.dpo.beta == 0.5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_builds_its_model_abstractly(path):
    cfg = load_config(path)
    arch = cfg.model.architecture
    assert arch is not None, f"{path.name}: set model.architecture so the config can be checked offline"
    model_cfg = config_from_hf(arch, source=f"{path.name}:model.architecture")
    abstract = nnx.eval_shape(lambda: build_model(model_cfg))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    assert n_params > 0


@pytest.mark.parametrize("override, message", [
    ("sft.batch_size=-3", r"sft.batch_size: -3 is out of range; allowed: \[1, inf\)"),
    ("sft.max_steps=0", r"sft.max_steps: 0 is out of range"),
    ("dpo.optimizer.lr=-1e-6", r"dpo.optimizer.lr: -1e-06 is out of range; allowed: \[0, inf\)"),
    ("dpo.beta=0", r"dpo.beta: 0.0 is out of range; allowed: \(0, inf\)"),
    ("negatives.top_p=0", r"negatives.top_p: 0.0 is out of range; allowed: \(0, 1\]"),
    ("negatives.top_p=1.5", r"negatives.top_p: 1.5 is out of range"),
    ("negatives.temperature=-0.5", r"negatives.temperature: -0.5 is out of range"),
    ("sft.optimizer.warmup_ratio=1", r"warmup_ratio: 1.0 is out of range; allowed: \[0, 1\)"),
    ("dpo.label_smoothing=0.5", r"dpo.label_smoothing: 0.5 is out of range; allowed: \[0, 0.5\)"),
    ("mesh.fsdp=0", r"mesh.fsdp: 0 is out of range; allowed: \[1, inf\) or -1"),
    ("data.buckets=[64,0]", r"data.buckets\[1\]: 0 is out of range"),
    ("data.max_train_records=0", r"data.max_train_records: 0 is out of range"),
    ("eval.responses.top_p=2", r"eval.responses.top_p: 2.0 is out of range"),
    ("run.seed=-1", r"run.seed: -1 is out of range"),
    ("negatives.filter_margin=-0.5", r"negatives.filter_margin: -0.5 is out of range; allowed: \[0, inf"),
    ("negatives.max_records=0", r"negatives.max_records: 0 is out of range"),
    ("negatives.records=disjunct", r"negatives.records: 'disjunct' is not one of .*'disjoint'"),
    ("data.truncation=cut", r"data.truncation: 'cut' is not one of \['truncate', 'drop'\]"),
])
def test_values_out_of_range_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, (override,))


def test_values_on_the_edge_of_a_range_load():
    cfg = load_config(None, ("negatives.top_p=1", "negatives.temperature=0", "mesh.fsdp=-1",
                             "dpo.optimizer.lr=0", "sft.optimizer.warmup_ratio=0"))
    assert cfg.negatives.top_p == 1.0 and cfg.negatives.temperature == 0.0 and cfg.mesh.fsdp == -1


@pytest.mark.parametrize("setup, fragment", [
    (lambda tmp: (tmp / "bad.jsonl").write_text('{"persona": ["x"]}\n') and
     [f"data.train={tmp / 'bad.jsonl'}", f"data.dev={tmp / 'bad.jsonl'}"], "bad.jsonl:1: "),
    (lambda tmp: ["model.checkpoint=/nonexistent/ckpt", "model.tokenizer=null",
                  "model.architecture=null"], "model.checkpoint: /nonexistent/ckpt is not a folder"),
    (lambda tmp: [f"model.checkpoint={tmp / 'runs/other/sft/best'}", "model.tokenizer=null",
                  "model.architecture=null"], "another run's output: run the config that writes"),
    (lambda tmp: ["sft.batch_size=-3"], "sft.batch_size: -3 is out of range"),
])
def test_cli_user_mistakes_are_one_line_and_status_2(tmp_path, capsys, setup, fragment):
    """A malformed data file, a missing checkpoint folder, a bad value: one line, exit 2."""
    from pdpo_jax.train.__main__ import main
    overrides = setup(tmp_path)
    status = main(["--config", "configs/tiny_sft.yaml", f"run.out_dir={tmp_path / 'run'}",
                   *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_every_reward_architecture_builds_its_classifier_abstractly():
    """Configs with an rl.reward.architecture: the NLI classifier it describes (with the
    configured tokenizer's vocabulary and labels) builds with jax.eval_shape."""
    from pdpo_jax.reward.nli_data import load_tokenizer
    from pdpo_jax.reward.train import classifier_config
    checked = 0
    for path in CONFIGS:
        section = load_config(path).rl.reward
        if section.architecture is None:
            continue
        model_cfg = classifier_config(section, load_tokenizer(section.tokenizer))
        assert model_cfg.labels == section.labels, path.name
        abstract = nnx.eval_shape(lambda: build_model(model_cfg))  # noqa: B023
        assert abstract.classifier_DC.shape[-1] == len(section.labels), path.name
        checked += 1
    assert checked >= 1  # configs/tiny_reward.yaml at least


def test_reward_section_ranges_and_names():
    cfg = load_config(None, ("rl.reward.max_length=64",))
    assert cfg.rl.reward.buckets == (32, 64)
    assert cfg.rl.reward.function == "song2020" and cfg.rl.reward.optimizer.lr == 2e-5
    with pytest.raises(ConfigError, match=r"rl.reward.max_length: 0 is out of range"):
        load_config(None, ("rl.reward.max_length=0",))
    with pytest.raises(ConfigError, match=r"rl.reward.function: 'sum' is not one of"):
        load_config(None, ("rl.reward.function=sum",))
