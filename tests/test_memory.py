"""The memory planner: exact bytes on a tiny config derived by hand, sharding arithmetic, the
activation table against what JAX really saves for backward, and every shipped config."""
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # private, pinned jax: the ground truth

from pdpo_jax import memory
from pdpo_jax.config import load_config
from pdpo_jax.models import build_model, config_from_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny_sft.yaml"  # llama: V=4096 D=64 F=192 L=2 N=4 K=2 H=16, tied, fp32

# Parameter count of the tiny model, term by term.
V, D, F, L, N, K, H = 4096, 64, 192, 2, 4, 2, 16
NORMS = D + L * 2 * D  # final norm + two per layer: never sharded (the `norm` axis)
MATRICES = V * D + L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
P = NORMS + MATRICES


def _plan(stage="sft", mesh=memory.MeshShape(1, 1, 1), *overrides):
    """The plan of the tiny config with one row per example (data.packing=false) unless an
    override says otherwise."""
    cfg = load_config(REPO / TINY, ("data.packing=false", *overrides))
    return memory.plan(cfg, mesh, stage, 16 * memory.GiB)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_auto_packing_plans_the_larger_layout(stage):
    """data.packing: auto picks its layout from the data at run time, so the planner budgets
    for whichever of packed rows and padded buckets needs more."""
    plans = {p: _plan(stage, memory.MeshShape(), f"data.packing={p}") for p in ("true", "false", "auto")}
    want = max(plans["true"].total("train"), plans["false"].total("train"))
    assert plans["auto"].total("train") == want
    assert any("data.packing: auto" in n for n in plans["auto"].notes)


def test_tiny_config_bytes_by_hand():
    p = _plan("sft")
    assert p.train["parameters"][0] == 4 * P == 1_443_072
    # AdamW's mu and nu (fp32 like the params) plus two int32 step counts (adam's and the
    # learning-rate schedule's).
    assert p.train["optimizer state"][0] == 2 * 4 * P + 2 * 4
    assert p.train["gradients"][0] == 4 * P
    assert "reference parameters" not in p.train
    # Activations, remat=none: rows = sft.batch_size 16, T = 256 (the bucket of
    # max_total_tokens 256). Per token per layer, fp32: 4D + 3F + 2NH + 2KH in the compute
    # dtype (residual-stream and norm outputs; SwiGLU's gate, up and product; q, k, v and the
    # attention output), 2D + 4 in fp32 (norm inputs and statistics). No [N, T] softmax row:
    # attention recomputes its probabilities in the backward.
    rows, T = 16, 256
    per_token = (4 * D + 3 * F + 2 * N * H + 2 * K * H) * 4 + (2 * D + 4) * 4
    assert per_token == 4_624
    assert p.per_layer["none"] == rows * T * per_token
    assert p.per_layer["full"] == rows * T * D * 4  # only the block input
    # Once: the bool [T, T] mask per row, RoPE cos/sin for q and k, and three fp32 [rows, T, D]
    # buffers (embedding output, final norm, the loss's gather).
    once = rows * T * T + 4 * rows * T * H * 4 + 3 * rows * T * D * 4
    assert p.train["activations"][0] == L * rows * T * per_token + once
    # Logits: [rows, min(128, max_response_tokens=48), V] fp32, value and gradient.
    assert p.train["transient"][0] == rows * 48 * V * 4 * 2
    # KV cache: negatives.batch_size 32, S = prompt (256 - 48 → 224, a multiple of 32) + 48.
    assert p.sampling["kv cache"][0] == 2 * L * 32 * (224 + 48) * K * H * 4
    # The weights are loaded in the decode layout; the sampler adds the (tied) LM head as
    # [D, V], fp32.
    assert p.sampling["decode LM head"][0] == 4 * V * D
    assert p.total("train") == sum(b for b, _ in p.train.values())


def test_dpo_adds_reference_and_doubles_rows():
    sft = _plan("sft", memory.MeshShape(), "dpo.batch_size=16")
    dpo = _plan("dpo", memory.MeshShape(), "dpo.batch_size=16", "dpo.share_prompt=false")
    assert dpo.train["reference parameters"][0] == dpo.train["parameters"][0] == 4 * P
    assert dpo.per_layer["none"] == 2 * sft.per_layer["none"]  # chosen + rejected rows
    shared = _plan("dpo", memory.MeshShape(), "dpo.batch_size=16")  # share_prompt: the default
    # the same 2 x 16 x 48 scored positions: [32, 48, V] unshared, [16, 2 x 48, V] shared
    assert shared.train["transient"][0] == dpo.train["transient"][0]
    assert "[16, 96, V]" in shared.train["transient"][1]
    assert shared.per_layer["none"] < dpo.per_layer["none"]  # 16 rows of T + window, not 32 of T
    precomputed = _plan("dpo", memory.MeshShape(), "dpo.batch_size=16", "dpo.share_prompt=false",
                        "dpo.precompute_ref=true")
    assert "reference parameters" not in precomputed.train
    assert precomputed.total("train") == dpo.total("train") - 4 * P
    # bf16 compute: the frozen reference holds every matrix (the layers' and the tied
    # embedding) in bf16, the norms in fp32, as `frozen_forward_params` keeps them
    bf16 = _plan("dpo", memory.MeshShape(), "dpo.batch_size=16", "model.dtype=bfloat16")
    assert bf16.train["reference parameters"][0] == 4 * NORMS + 2 * MATRICES
    assert bf16.train["parameters"][0] == 4 * P


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_divides_sharded_params(n):
    p = _plan("sft", memory.MeshShape(1, n, 1), f"sft.batch_size={16 * n}")
    assert p.train["parameters"][0] == 4 * MATRICES // n + 4 * NORMS
    assert p.train["optimizer state"][0] == 2 * (4 * MATRICES // n + 4 * NORMS) + 8
    # The batch splits too: the same rows per device as the 1-device plan of batch 16.
    assert p.per_layer["none"] == _plan("sft").per_layer["none"]
    # Sampling keeps `embed` unsharded: fsdp does not shrink its weights.
    assert p.sampling["parameters"][0] == 4 * P


def test_tensor_parallel_splits_heads_mlp_and_vocab():
    p = _plan("sft", memory.MeshShape(1, 1, 2))
    assert p.train["parameters"][0] == 4 * MATRICES // 2 + 4 * NORMS
    assert p.sampling["parameters"][0] == 4 * MATRICES // 2 + 4 * NORMS


def test_tensor_parallel_activations_split_only_what_divides():
    """Heads/kv heads/mlp split over `tensor` only when it divides them (else the sharding
    rules replicate them): a 9/3-head model with mlp 1536 on tensor=2 splits only the mlp, so
    it plans like the same model with mlp 768 on one device; 8 heads over 8 kv-replicated
    devices (4 kv heads) must plan, not fail ModelConfig's heads/kv check."""
    hf = dict(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
              num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)
    c = config_from_hf(hf)
    for remat in ("none", "full", "dots_saveable"):
        assert (memory.layer_activation_bytes(c, 2, 64, remat, tensor=2)
                == memory.layer_activation_bytes(c.replace(mlp_dim=768), 2, 64, remat))
    c8 = config_from_hf({**hf, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64})
    assert (memory.layer_activation_bytes(c8, 2, 64, "none", tensor=8)
            < memory.layer_activation_bytes(c8, 2, 64, "none"))


def test_shard_bytes_rounds_up_uneven_dims():
    mesh = memory.MeshShape(1, 4, 2)
    assert memory.shard_bytes((10, 6), jnp.float32, ("fsdp", "tensor"), mesh) == 3 * 3 * 4
    assert memory.shard_bytes((10, 6), jnp.bfloat16, (("fsdp", "tensor"), None), mesh) == 2 * 6 * 2


# ---------------------------------------------------------------------------------------------
# The activation table against JAX's own saved residuals.

ARCHS = {
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def _saved_bytes(arch, layers, remat, dtype, rows=2, T=64):
    hf = {**ARCHS[arch], ("num_hidden_layers" if arch == "llama" else "n_layer"): layers}
    cfg = config_from_hf(hf).replace(remat=remat, dtype=dtype)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))

    def loss(params, tokens):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(T), (rows, T))
        h, _ = model.hidden_states(tokens, positions, jnp.ones((rows, T), bool))
        return jnp.sum(h.astype(jnp.float32) ** 2)

    residuals = saved_residuals(loss, params, jax.ShapeDtypeStruct((rows, T), jnp.int32))
    # Residuals that are the parameters themselves cost nothing extra.
    total = sum(a.size * a.dtype.itemsize for a, src in residuals if "argument" not in src)
    return cfg, total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_table_equals_saved_residuals(arch, remat, dtype):
    """One more layer adds the table's bytes (up to a few broadcast norm scales and biases,
    < 4·D fp32 values per layer). What is saved once is within 5% of the planner's term; that
    term's few [rows, T, D] buffers were counted on this very loss, sum(h²), so this half is a
    regression guard, not an independent prediction (the chunked log-prob head gathers a
    little differently)."""
    rows, T = 2, 64
    cfg2, two = _saved_bytes(arch, 2, remat, dtype, rows, T)
    _, three = _saved_bytes(arch, 3, remat, dtype, rows, T)
    per_layer = memory.layer_activation_bytes(cfg2, rows, T, remat)
    assert 0 <= (three - two) - per_layer <= 4 * cfg2.d_model * 4
    once = two - 2 * (three - two)
    planned = memory._once_activation_bytes(cfg2, rows, T, remat)
    assert planned == pytest.approx(once, rel=0.05), (once, planned)


# ---------------------------------------------------------------------------------------------
# Every shipped config, and the command line.

def _configs_with_architecture():
    """(config, stage) for every shipped config that declares its architecture, for each
    training stage it runs (sft-only configs are not planned for DPO: their dpo section is
    the default, not a setting anyone chose)."""
    out = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        cfg = load_config(path)
        if cfg.model.architecture is None:
            continue
        trained = [s for s in ("sft", "dpo") if s in cfg.run.stages]
        for stage in trained or (["dpo"] if "rl" not in cfg.run.stages else []):
            out.append((str(path.relative_to(REPO)), stage))
    return out


@pytest.mark.parametrize("config, stage", _configs_with_architecture())
def test_every_config_plans(config, stage, capsys):
    cfg = load_config(REPO / config)
    # 8 devices fill a -1 mesh axis (the paper configs declare theirs).
    rc = memory.main(["--config", str(REPO / config), "--stage", stage, "--num_devices", "8",
                      "--device_memory", "80GB"])
    out = capsys.readouterr().out
    assert rc in (0, 1), out
    assert ("does NOT fit" in out.split("sampling")[0]) == (rc == 1)
    for item in ("parameters", "optimizer state", "gradients", "activations", "kv cache", "total"):
        assert item in out
    assert ("reference parameters" in out) == (stage == "dpo" and not cfg.dpo.precompute_ref)
    section = getattr(cfg, stage)  # the stage's gradient checkpointing, else the model's
    assert f"remat={section.remat or cfg.model.remat}" in out


def test_cli_mesh_and_errors(capsys):
    assert memory.main(["--config", str(REPO / TINY), "--mesh", "data=2,fsdp=4,tensor=1",
                        "--device_memory", "16GiB"]) == 0
    assert "mesh data=2 fsdp=4 tensor=1 (8 devices)" in capsys.readouterr().out
    assert memory.main(["--config", str(REPO / TINY), "--mesh", "fsdp=3"]) == 2
    assert "divisible by data*fsdp = 3" in capsys.readouterr().err
    assert memory.main(["--config", str(REPO / TINY), "--mesh", "pipeline=2"]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err
    assert memory.main(["--config", str(REPO / TINY), "--device_memory", "lots"]) == 2
    assert memory.main(["--config", str(REPO / TINY), "--device_memory", "1MiB"]) == 1
    assert "does NOT fit in 1.00 MiB" in capsys.readouterr().out
    assert memory.parse_bytes("16GiB") == 16 * 2**30 and memory.parse_bytes("80GB") == 80 * 10**9
