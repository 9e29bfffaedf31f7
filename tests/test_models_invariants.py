"""Model invariants that need no reference: causality, remat, jit, KV cache, sharded loading."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import left_padded_batch, tiny_hf_model
from pdpo_jax import sharding
from pdpo_jax.models import KVCache, ModelConfig, build_model, from_pretrained

LLAMA = ModelConfig(arch="llama", vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-5, max_positions=64)
GPT2 = ModelConfig(arch="gpt2", hf_model_type="gpt2", vocab_size=61, d_model=32, num_layers=2,
                   num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=48, norm_eps=1e-5,
                   max_positions=64, tie_embeddings=True)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


def _batch(lengths=(10, 6), seed=0):
    return [jnp.asarray(a) for a in left_padded_batch(np.random.default_rng(seed), 61, list(lengths))]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_causality(arch):
    model = build_model(CONFIGS[arch], seed=1)
    tokens, mask, positions = _batch()
    logits, _ = model(tokens, positions, mask)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 5) % 61)
    logits2, _ = model(changed, positions, mask)
    np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(logits2[:, :7]))
    assert not np.allclose(np.asarray(logits[:, 7:]), np.asarray(logits2[:, 7:]))


def _loss_and_grads(cfg, tokens, mask, positions):
    graphdef, params = nnx.split(build_model(cfg, seed=2))

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 3])
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_remat_equals_no_remat(arch):
    tokens, mask, positions = _batch()
    plain_loss, plain = _loss_and_grads(CONFIGS[arch], tokens, mask, positions)
    for policy in ("full", "dots_saveable"):
        loss, grads = _loss_and_grads(CONFIGS[arch].replace(remat=policy), tokens, mask, positions)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, plain)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unrolled_layers_equal_scanned(arch):
    tokens, mask, positions = _batch()
    plain_loss, plain = _loss_and_grads(CONFIGS[arch], tokens, mask, positions)
    for remat in ("none", "dots_saveable"):
        cfg = CONFIGS[arch].replace(unroll_layers=True, remat=remat)
        loss, grads = _loss_and_grads(cfg, tokens, mask, positions)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, plain)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("BTD,DF->BTF", (3, 5, 8), (8, 12)),
    ("BTD,DCNH->CBTNH", (2, 4, 8), (8, 3, 2, 4)),
    ("BTNH,NHD->BTD", (2, 4, 2, 4), (2, 4, 8)),
])
def test_dense_vjp_equals_autodiff(spec, x_shape, w_shape):
    """The hand-written backward of `dense`/`unembed` against jax autodiff of a plain einsum:
    equal in fp32; in bf16 within bf16 rounding of the fp32 gradient, with bf16 cotangents."""
    from pdpo_jax.models.ops import dense, unembed
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    g = jax.random.normal(kg, out_shape)

    def grads(f, x, w):
        return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g), argnums=(0, 1))(x, w)

    # the forward too: "BTNH,NHD->BTD" runs as one merged contraction (`_einsum_flat`)
    np.testing.assert_allclose(dense(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
    ref = grads(lambda x, w: jnp.einsum(spec, x, w), x, w)
    ours = grads(lambda x, w: dense(spec, x, w), x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    bf = grads(lambda x, w: dense(spec, x, w), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert [a.dtype for a in bf] == [jnp.bfloat16, jnp.bfloat16]
    for a, b in zip(bf, ref):
        # bf16 rounds operands, cotangent and result (unit roundoff 2^-8 each) around an fp32
        # accumulation: an empirical tolerance, measured ≤ 0.32% of the largest gradient;
        # 2^-7 (0.78%) leaves 2.4x margin.
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2**-7 * scale)

    h, wv = jax.random.normal(kx, (2, 3, 8)), jax.random.normal(kw, (11, 8))
    gv = jax.random.normal(kg, (2, 3, 11))
    f_ref = jax.grad(lambda h, w: jnp.sum(jnp.einsum("BTD,VD->BTV", h, w) * gv), argnums=(0, 1))
    f_our = jax.grad(lambda h, w: jnp.sum(unembed(h, w) * gv), argnums=(0, 1))
    for a, b in zip(f_our(h, wv), f_ref(h, wv)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert unembed(h.astype(jnp.bfloat16), wv.astype(jnp.bfloat16)).dtype == jnp.float32


def test_scale_vjp_equals_autodiff():
    from pdpo_jax.models.ops import scale
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x, w, g = jax.random.normal(kx, (3, 5, 8)), jax.random.normal(kw, (8,)), jax.random.normal(kg, (3, 5, 8))
    ref = jax.grad(lambda x, w: jnp.sum(x * w[None, None] * g), argnums=(0, 1))(x, w)
    ours = jax.grad(lambda x, w: jnp.sum(scale(x, w) * g), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_swiglu_vjp_equals_autodiff_and_the_formula():
    """fp32: the hand-written backward equals autodiff of silu(a)·b. bf16: each gradient is
    the float64 formula's rounded once to bf16 (half a bf16 step, 2^-9 relative), where
    autodiff rounds its bf16 intermediates too."""
    from pdpo_jax.models.ops import swiglu
    ka, kb, kg = jax.random.split(jax.random.key(2), 3)
    a, b = 3 * jax.random.normal(ka, (3, 5, 16)), jax.random.normal(kb, (3, 5, 16))
    g = jax.random.normal(kg, (3, 5, 16))

    def grads(f, a, b):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * g), argnums=(0, 1)))(a, b)

    np.testing.assert_array_equal(swiglu(a, b), jax.nn.silu(a) * b)
    for ours, ref in zip(grads(swiglu, a, b), grads(lambda a, b: jax.nn.silu(a) * b, a, b)):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    # the cotangent reaching swiglu is g rounded to bf16 (the transpose of .astype(float32))
    a64, b64, g64 = (np.asarray(x, np.float64) for x in (a16, b16, g.astype(jnp.bfloat16)))
    sig = 1 / (1 + np.exp(-a64))
    want = (g64 * b64 * sig * (1 + a64 * (1 - sig)), g64 * a64 * sig)
    for ours, exact in zip(grads(swiglu, a16, b16), want):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=2**-8, atol=1e-30)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_jit_equals_eager(arch):
    model = build_model(CONFIGS[arch], seed=3)
    tokens, mask, positions = _batch()
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a)[0])(params, tokens, positions, mask)
    eager, _ = model(tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kv_cache_decode_equals_full_forward(arch):
    """Prefill a left-padded prompt, then feed one token at a time: same logits as no cache."""
    model = build_model(CONFIGS[arch], seed=4)
    tokens, mask, positions = _batch(lengths=(12, 8))
    full, _ = model(tokens, positions, mask)
    prefill = 6
    cache = KVCache.init(model.cfg, batch=2, max_len=16)
    logits, cache = model(tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache)
    steps = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(logits)
    incremental = np.asarray(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(incremental[np.asarray(mask)], np.asarray(full)[np.asarray(mask)],
                               atol=1e-5, rtol=1e-5)
    assert int(cache.length) == tokens.shape[1]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_segments_after_a_cached_prefix_equal_each_continuation_alone(arch):
    """A prefix run into the cache, then one row of three continuations as segments (positions
    from the prefix's end): each continuation's hidden states equal [prefix | it] run alone
    without a cache; the cache is a prefix every segment sees, and segments never see each
    other. An empty cache has no prefix: segments with it are refused."""
    from pdpo_jax.models.attention import segment_id
    model = build_model(CONFIGS[arch], seed=6)
    rng = np.random.default_rng(6)
    prefix = rng.integers(1, 61, 7)
    conts = [rng.integers(1, 61, n) for n in (3, 5, 2)]
    cache = KVCache.init(model.cfg, batch=1, max_len=7 + 12)
    _, cache = model.hidden_states(jnp.asarray(prefix)[None], jnp.arange(7)[None],
                                   jnp.ones((1, 7), bool), cache)
    row = np.concatenate(conts + [np.zeros(2, int)])  # 2 padding columns
    positions = np.concatenate([7 + np.arange(len(c)) for c in conts] + [np.zeros(2, int)])
    segments = np.concatenate([np.full(len(c), segment_id(1, j + 1)) for j, c in enumerate(conts)]
                              + [np.zeros(2, int)])
    h, _ = model.hidden_states(jnp.asarray(row)[None], jnp.asarray(positions)[None],
                               jnp.asarray(segments > 0)[None], cache,
                               segments_BT=jnp.asarray(segments)[None])
    start = 0
    for c in conts:
        alone = np.concatenate([prefix, c])
        want, _ = model.hidden_states(jnp.asarray(alone)[None], jnp.arange(len(alone))[None],
                                      jnp.ones((1, len(alone)), bool))
        np.testing.assert_allclose(np.asarray(h[0, start:start + len(c)]),
                                   np.asarray(want[0, 7:]), atol=1e-5, rtol=1e-5)
        start += len(c)
    with pytest.raises(ValueError, match="cache holding their prefix"):
        model.hidden_states(jnp.asarray(row)[None], jnp.asarray(positions)[None],
                            jnp.asarray(segments > 0)[None], KVCache.init(model.cfg, 1, 12),
                            segments_BT=jnp.asarray(segments)[None])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_selected_columns_equal_all_columns(arch):
    """hidden_states(select_BQ=idx) (the last layer run at those columns only) equals all the
    columns' hidden states gathered at idx, values and parameter gradients, for a rolled scan,
    an unrolled one with and without remat, and a prefill into a KV cache (same cache)."""
    from pdpo_jax.models.layers import run_layers, take_columns
    tokens, mask, positions = _batch(lengths=(12, 8))
    index = jnp.asarray([[11, 3, 7, 7], [11, 4, 5, 9]], jnp.int32)  # row-varying, a repeat
    g = jax.random.normal(jax.random.key(0), (2, 4, CONFIGS[arch].d_model))
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                    rtol=1e-5)
    for changes in ({}, dict(unroll_layers=True), dict(unroll_layers=True, remat="dots_saveable")):
        graphdef, params = nnx.split(build_model(CONFIGS[arch].replace(**changes), seed=5))

        def out(p, select):
            model = nnx.merge(graphdef, p)
            if select:
                return model.hidden_states(tokens, positions, mask, select_BQ=index)[0]
            return take_columns(model.hidden_states(tokens, positions, mask)[0], index)
        assert out(params, True).shape == (2, 4, CONFIGS[arch].d_model)
        close(out(params, True), out(params, False))
        grads = [jax.grad(lambda p, s=s: jnp.sum(out(p, s) * g))(params) for s in (True, False)]
        # gradients of O(1-10): fp32 summation order differs (gathered vs scattered columns)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)

    model = build_model(CONFIGS[arch], seed=5)  # a rolled scan refuses rather than ignores
    with pytest.raises(ValueError, match="rolled layer scan"):
        run_layers(model.cfg, model.layers, jnp.zeros((2, 12, model.cfg.d_model)), positions,
                   mask, None, select_BQ=index)
    full, full_cache = model.hidden_states(tokens, positions, mask, KVCache.init(model.cfg, 2, 16))
    last, cache = model.hidden_states(tokens, positions, mask, KVCache.init(model.cfg, 2, 16),
                                      select_BQ=jnp.full((2, 1), 11, jnp.int32))
    close(last, full[:, -1:])
    jax.tree.map(close, cache, full_cache)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unstacked_layers_equal_stacked(arch):
    """`unstack_layers` (what the decode loop runs) changes no logit, with or without a cache."""
    from pdpo_jax.models.layers import unstack_layers
    tokens, mask, positions = _batch(lengths=(12, 8))
    stacked = build_model(CONFIGS[arch], seed=4)
    unstacked = unstack_layers(build_model(CONFIGS[arch], seed=4))
    assert len(unstacked.layers) == stacked.cfg.num_layers
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                    rtol=1e-5)  # scan vs loop: fusion order
    close(unstacked(tokens, positions, mask)[0], stacked(tokens, positions, mask)[0])

    def prefill_then_step(model):
        cache = KVCache.init(model.cfg, batch=2, max_len=16)
        _, cache = model(tokens[:, :6], positions[:, :6], mask[:, :6], cache)
        return model(tokens[:, 6:7], positions[:, 6:7], mask[:, 6:7], cache)[0]
    close(prefill_then_step(unstacked), prefill_then_step(stacked))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unstacked_matrices_in_compute_dtype_change_no_number(arch):
    """The decode layout's bf16 matrices (`unstack_layers(matrices_dtype=)`) give the very same
    logits and cache as casting at each use; norm scales stay fp32 (GPT-2 applies them so)."""
    from pdpo_jax.models.layers import unstack_layers
    cfg = CONFIGS[arch].replace(dtype="bfloat16")
    tokens, mask, positions = _batch(lengths=(12, 8))
    plain = unstack_layers(build_model(cfg, seed=4))
    cast = unstack_layers(build_model(cfg, seed=4), matrices_dtype=jnp.bfloat16)
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(nnx.state(cast.layers)) if x.ndim >= 2}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(cast.layers)) if x.ndim == 1)

    @jax.jit
    def prefill_then_step(model):
        cache = KVCache.init(model.cfg, batch=2, max_len=16)
        first, cache = model(tokens[:, :6], positions[:, :6], mask[:, :6], cache)
        second, cache = model(tokens[:, 6:7], positions[:, 6:7], mask[:, 6:7], cache)
        return first, second, cache
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 prefill_then_step(cast), prefill_then_step(plain))


def test_bf16_compute_gives_fp32_logits():
    model = build_model(LLAMA.replace(dtype="bfloat16"), seed=5)
    tokens, mask, positions = _batch()
    logits, _ = model(tokens, positions, mask)
    assert logits.dtype == jnp.float32
    reference, _ = build_model(LLAMA, seed=5)(tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=0.05)


def test_sharded_load_matches_unsharded(tmp_path):
    hf = tiny_hf_model("mistral")
    hf.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = from_pretrained(tmp_path, mesh=mesh)
    plain = from_pretrained(tmp_path)
    q = sharded.layers.attn.q_DNH[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.layers.attn.q_DNH[...]))
    tokens, mask, positions = _batch()
    a, _ = sharded(tokens, positions, mask)
    b, _ = plain(tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_rules_refuse_unknown_axis_and_replicate_bad_divisor():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "mystery"), rules=sharding.TRAIN_RULES)
    P = jax.sharding.PartitionSpec
    assert sharding.logical_to_spec(("embed", "kv_heads"), (8, 3), mesh=mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "kv_heads"), (8, 4), mesh=mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "vocab"), (8, 4), mesh=mesh) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
