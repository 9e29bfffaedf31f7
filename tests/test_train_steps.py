"""SFT and DPO steps: step-0 DPO loss, gradient accumulation, and sharded == unsharded."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batches import micro, pair_rows, sft_rows
from pdpo_jax import sharding
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.models import ModelConfig
from pdpo_jax.models.layers import frozen_forward_params
from pdpo_jax.train import optim, state as st
from pdpo_jax.train.steps import DpoObjective, make_dpo_step, make_sft_step

CFG = ModelConfig(arch="llama", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, max_positions=64)
# Adam divides by sqrt(v) + eps: with eps=1e-8 a gradient entry near 0 turns rounding noise
# into an O(lr) update, so equality tests of updated params use a well-conditioned eps.
OPT = OptimizerConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", eps=1e-3)


def _setup(mesh_shape=(1, 1, 1), total=10, cfg=CFG):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    graphdef, params = st.init_params(cfg, mesh, seed=0)
    tx, lr = optim.make_optimizer(OPT, total)
    state, state_sh = st.create_state(params, tx, mesh)
    return mesh, graphdef, tx, lr, state, state_sh


def _sft_batch(B=8, seed=0):
    rng = np.random.default_rng(seed)
    specs = [(int(rng.integers(2, 10)), int(rng.integers(1, 8))) for _ in range(B)]
    return sft_rows(rng, 64, specs, T=20)


def _dpo_batch(B=8, seed=0):
    rng = np.random.default_rng(seed)
    specs = [(int(rng.integers(2, 10)), int(rng.integers(1, 8)), int(rng.integers(1, 8))) for _ in range(B)]
    return pair_rows(rng, 64, specs, T=20)


@functools.cache
def _reference_runs():
    """One-device SFT and DPO runs, shared by the sharded comparisons."""
    return _run_sft((1, 1, 1), _sft_batch()), _run_dpo((1, 1, 1), _dpo_batch())


def _run_sft(mesh_shape, batch, A=1, steps=2):
    mesh, graphdef, tx, lr, state, state_sh = _setup(mesh_shape)
    step = st.jit_sft_step(make_sft_step(graphdef, tx, lr, window=8, chunk=4), state_sh, mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, st.shard_batch(micro(batch, A), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def _run_dpo(mesh_shape, batch, steps=2, objective=DpoObjective(), share_prompt=False, cfg=CFG,
             frozen=False):
    """frozen: the reference as the DPO stage holds it (`frozen_forward_params`), else a plain
    copy of the policy's params."""
    mesh, graphdef, tx, lr, state, state_sh = _setup(mesh_shape, cfg=cfg)
    ref = (frozen_forward_params(nnx.merge(graphdef, state.params)) if frozen
           else jax.tree.map(lambda x: x.copy(), state.params))
    step = st.jit_dpo_step(make_dpo_step(graphdef, tx, lr, objective, window=8, chunk=4,
                                         share_prompt=share_prompt), state_sh, mesh)
    history = []
    for _ in range(steps):
        state, metrics = step(state, ref, st.shard_batch(micro(batch), mesh))
        history.append(jax.device_get(metrics))
    return history, jax.device_get(state.params)


def test_dpo_step_zero_loss_is_log2_and_learns():
    history, _ = _run_dpo((1, 1, 1), _dpo_batch(), steps=3)
    assert history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["pairs"] == 8
    assert history[2]["loss"] < history[0]["loss"]
    assert history[2]["rewards/accuracies"] > 0.5


def test_sft_gradient_accumulation_equals_big_batch():
    batch = _sft_batch(B=8)
    big, big_params = _run_sft((1, 1, 1), batch, A=1)
    acc, acc_params = _run_sft((1, 1, 1), batch, A=4)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_params, big_params)


# fp32 on CPU: sharded matmuls reduce partial sums in a different order, so results agree to
# ~1e-6 relative, not bitwise; 1e-5 relative (and 1e-6 absolute for tiny entries) bounds it.
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_sft_and_dpo_equal_one_device(mesh_shape):
    sft_batch, dpo_batch = _sft_batch(), _dpo_batch()
    (ref_losses, ref_params), (ref_hist, ref_dpo) = _reference_runs()
    losses, params = _run_sft(mesh_shape, sft_batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)
    hist, dpo = _run_dpo(mesh_shape, dpo_batch)
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), dpo, ref_dpo)


def test_nan_loss_leaves_state_untouched():
    mesh, graphdef, tx, lr, state, state_sh = _setup()
    step = st.jit_sft_step(make_sft_step(graphdef, tx, lr, window=8), state_sh, mesh)
    poisoned = jax.tree.map(lambda x: x, state)
    poisoned.params["embed_VD"][...] = jnp.full_like(poisoned.params["embed_VD"][...], jnp.nan)
    # read before the call: the step donates its state
    want_params, want_opt = jax.device_get((poisoned.params, poisoned.opt_state))
    out, metrics = step(poisoned, st.shard_batch(micro(_sft_batch()), mesh))
    assert not bool(metrics["finite"]) and int(out.step) == 0
    # every parameter (the NaN embedding too) and every optimizer moment as they were
    got_params, got_opt = jax.device_get((out.params, out.opt_state))
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
    jax.tree.map(np.testing.assert_array_equal, got_opt, want_opt)


def test_indivisible_batch_is_a_clear_error():
    mesh = sharding.make_mesh(8, 1, 1)
    with pytest.raises(ValueError, match="global batch size 6 must be divisible by data\\*fsdp = 8"):
        st.shard_batch(micro(_sft_batch(B=6)), mesh)


def test_no_weight_decay_on_norms_and_biases():
    import jax.tree_util as jtu
    _, graphdef, _, _, state, _ = _setup()
    flags = {jtu.keystr(p): optim.decays(p) for p, _ in jtu.tree_flatten_with_path(state.params)[0]}
    assert any("q_DNH" in k and v for k, v in flags.items())
    assert all(not v for k, v in flags.items() if "norm" in k)


SHARED_CONFIGS = {
    "llama-gqa": CFG,
    "mistral-window": CFG.replace(sliding_window=5),
    "qwen2-bias-tied": CFG.replace(qkv_bias=True, tie_embeddings=True),
    "gpt2": ModelConfig(arch="gpt2", hf_model_type="gpt2", vocab_size=64, d_model=32, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64, norm_eps=1e-5,
                        max_positions=64),
}


@pytest.mark.parametrize("name", sorted(SHARED_CONFIGS))
def test_shared_prompt_logps_equal_separate_rows(name):
    """One row per pair holding the prompt once gives every response token the log-prob it
    gets in its own row: any prompt/response lengths, a padding row, GQA, a sliding window
    shorter than the replies, learned positions (GPT-2), biases and tied embeddings."""
    from flax import nnx
    from pdpo_jax.models import build_model
    from pdpo_jax.train.steps import pair_logps
    graphdef, params = nnx.split(build_model(SHARED_CONFIGS[name], seed=1))
    rng = np.random.default_rng(2)
    specs = [(9, 8, 1), (2, 1, 8), (5, 3, 7), (1, 8, 8), (7, 2, 2)]
    batch = pair_rows(rng, 64, specs, T=17)
    batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}  # + padding row
    separate, shared = (jax.jit(lambda p, s=s: pair_logps(graphdef, p, batch, window=8, chunk=4,
                                                          share_prompt=s))(params)
                        for s in (False, True))
    for a, b in zip(separate, shared):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    assert np.asarray(separate[2]).tolist() == [8, 1, 3, 8, 2, 0]
    assert np.asarray(separate[0])[-1] == 0.0 and np.asarray(shared[1])[-1] == 0.0


def test_shared_prompt_dpo_step_equals_separate_rows():
    """Two DPO steps with share_prompt: same loss, trl metrics and updated params (rtol 1e-5)."""
    batch = _dpo_batch()
    separate_hist, separate_params = _run_dpo((1, 1, 1), batch)
    shared_hist, shared_params = _run_dpo((1, 1, 1), batch, share_prompt=True)
    for a, b in zip(separate_hist, shared_hist):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6),
                 separate_params, shared_params)


def test_shared_prompt_sharded_equals_one_device():
    one, _ = _run_dpo((1, 1, 1), _dpo_batch(), share_prompt=True)
    sharded, _ = _run_dpo((2, 2, 2), _dpo_batch(), share_prompt=True)
    for a, b in zip(one, sharded):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SHARED_CONFIGS) + ["llama-untied-unrolled"])
def test_frozen_reference_in_compute_dtype_is_bit_identical(name):
    """With bf16 compute the DPO stage stores the frozen reference's matrices (and Llama's
    embedding and LM head) in bf16: two DPO steps give bit-identical metrics and params to an
    fp32 reference.
    GPT-2 catches a cast too many (its LayerNorm applies fp32 scales; it adds its two
    embeddings in fp32), every family a cast the forward does not make at each use."""
    base = SHARED_CONFIGS.get(name) or CFG.replace(unroll_layers=True)
    cfg = base.replace(dtype="bfloat16")
    batch = _dpo_batch()
    plain_hist, plain_params = _run_dpo((1, 1, 1), batch, cfg=cfg)
    frozen_hist, frozen_params = _run_dpo((1, 1, 1), batch, cfg=cfg, frozen=True)
    for a, b in zip(plain_hist, frozen_hist):
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    jax.tree.map(np.testing.assert_array_equal, frozen_params, plain_params)

    mesh, graphdef, *_, state, _ = _setup((2, 2, 2), cfg=cfg)  # the copy keeps the shardings
    ref = frozen_forward_params(nnx.merge(graphdef, state.params))
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(ref)}
    assert any(v == jnp.bfloat16 for k, v in dtypes.items() if "q_" in k or "qkv_" in k)
    assert all(v == jnp.float32 for k, v in dtypes.items() if "norm" in k or "ln_" in k)
    llama = cfg.arch == "llama"  # GPT-2 adds its token and position embeddings in fp32
    assert all(v == (jnp.bfloat16 if llama else jnp.float32) for k, v in dtypes.items() if "embed" in k)
    assert all(v == jnp.bfloat16 for k, v in dtypes.items() if "lm_head" in k)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.params)):
        assert a.sharding == b.sharding and a is not b


def test_frozen_reference_in_fp32_is_a_copy():
    """With compute = param dtype nothing is cast, and no array is the policy's own: the
    policy's buffers are donated to every step."""
    mesh, graphdef, *_, state, _ = _setup()
    ref = frozen_forward_params(nnx.merge(graphdef, state.params))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.params)):
        assert a.dtype == b.dtype and a is not b
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
        np.testing.assert_array_equal(a, b)


def test_frozen_reference_of_unstacked_layers_casts_the_same_arrays():
    from pdpo_jax.models import build_model
    from pdpo_jax.models.layers import unstack_layers
    model = build_model(CFG.replace(dtype="bfloat16"), seed=0)
    stacked = frozen_forward_params(model)
    unstacked = frozen_forward_params(unstack_layers(build_model(CFG.replace(dtype="bfloat16"), seed=0)))
    dtypes = lambda tree: {jax.tree_util.keystr(p): x.dtype  # noqa: E731
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    layer0 = dtypes(unstacked["layers"][0])
    assert layer0 == dtypes(stacked["layers"])
    assert set(layer0.values()) == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
