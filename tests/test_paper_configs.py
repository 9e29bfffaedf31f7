"""Every paper experiment config: its model builds abstractly and one DPO step lowers on the
8-device mesh it declares (8 fake CPU devices), without any weights."""
import pathlib

import jax
import pytest

from pdpo_jax import sharding
from pdpo_jax.config import load_config
from pdpo_jax.train.aot import lower_dpo_step

PAPER = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml")
               if not p.name.startswith("_"))


def test_there_is_a_config_per_paper_model():
    names = {p.stem for p in PAPER}
    for model in ("gpt2_medium", "qwen2_1_5b", "qwen2_7b", "mistral_7b", "llama2_7b", "llama2_13b"):
        assert f"en_{model}" in names
    for model in ("japanese_gpt2_medium", "japanese_gpt_1b", "swallow_7b", "swallow_13b",
                  "sarashina2_7b", "sarashina2_13b"):
        assert f"ja_{model}" in names


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_dpo_step_lowers_on_declared_mesh(path):
    cfg = load_config(path)
    n = cfg.mesh.data * max(cfg.mesh.fsdp, 1) * cfg.mesh.tensor
    assert n == 8 and len(jax.devices()) >= n, f"{path.name} declares {n} devices"
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.devices()[:n])
    lowered = lower_dpo_step(cfg, mesh)
    assert "sharding" in lowered.as_text()[:200_000]
