"""Every paper experiment config: its model builds abstractly and one DPO step lowers on the
8-device mesh it declares (8 fake CPU devices), without any weights, with every input and
output sharded as the rules table says."""
import pathlib

import jax
import jax.tree_util as jtu
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pdpo_jax import sharding
from pdpo_jax.config import load_config
from pdpo_jax.train.aot import dpo_step_and_args

PAPER = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml")
               if not p.name.startswith("_"))
_is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731


def test_there_is_a_config_per_paper_model():
    names = {p.stem for p in PAPER}
    for model in ("gpt2_medium", "qwen2_1_5b", "qwen2_7b", "mistral_7b", "llama2_7b", "llama2_13b"):
        assert f"en_{model}" in names
    for model in ("japanese_gpt2_medium", "japanese_gpt_1b", "swallow_7b", "swallow_13b",
                  "sarashina2_7b", "sarashina2_13b"):
        assert f"ja_{model}" in names


def _declared_shardings(step, args):
    """(in, out) shardings of the jit call, as the traced program declares them."""
    (eqn,) = [e for e in jax.make_jaxpr(step)(*args).eqns if "in_shardings" in e.params]
    return eqn.params["in_shardings"], eqn.params["out_shardings"]


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_dpo_step_lowers_on_declared_mesh_with_rule_shardings(path):
    cfg = load_config(path)
    n = cfg.mesh.data * max(cfg.mesh.fsdp, 1) * cfg.mesh.tensor
    assert n == 8 and len(jax.devices()) >= n, f"{path.name} declares {n} devices"
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.devices()[:n])
    step, (state, ref, batch) = dpo_step_and_args(cfg, mesh)
    step.lower(state, ref, batch)  # the program builds on this mesh
    ins, outs = _declared_shardings(step, (state, ref, batch))
    # one Variable is one leaf, so the Variables line up with the jit call's flat arguments
    items = [v for _, v in jtu.tree_flatten_with_path((state, ref), is_leaf=_is_var)[0]]
    n_state, n_ref = len(jax.tree.leaves(state)), len(jax.tree.leaves(ref))
    assert len(items) == n_state + n_ref
    in_state, in_ref, in_batch = ins[:n_state], ins[n_state:n_state + n_ref], ins[n_state + n_ref:]
    for item, got in zip(items, ins):
        if _is_var(item):  # parameters and optimizer moments: by their logical axes
            want = sharding.logical_to_spec(sharding.variable_names(item), item.shape, mesh=mesh)
            assert got.spec == want, (sharding.variable_names(item), got.spec, want)
            names = sharding.variable_names(item)
            if "embed" in names and item.shape[names.index("embed")] % 8 == 0:
                assert got.spec[names.index("embed")] == "fsdp", (names, got.spec)  # FSDP splits
        else:  # step and optimizer counters
            assert got.spec == P()
    # the frozen reference is sharded exactly like the policy
    params_start = 1  # after the step counter
    assert [s.spec for s in in_ref] == [s.spec for s in in_state[params_start:params_start + n_ref]]
    # batch rows over data x fsdp, micro-batches replicated
    assert len(in_batch) == 8 and all(s.spec == P(None, sharding.BATCH_AXES) for s in in_batch)
    # the new state comes back in the shardings it went in with (the step donates it)
    assert [s.spec for s in jax.tree.leaves(outs)[:n_state]] == [s.spec for s in in_state]
