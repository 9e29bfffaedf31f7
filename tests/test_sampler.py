"""The KV-cache sampler: HF `generate` parity, full-forward argmax, filters, RNG, EOS, n, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import hf_greedy, tiny_hf_model
from pdpo_jax import sharding
from pdpo_jax.models import from_pretrained
from pdpo_jax.sampling import (Sampler, SamplingConfig, filter_logits, generate, left_pad,
                               sample_tokens, top_k_mask, top_p_mask)
from pdpo_jax.sampling import filters
from pdpo_jax.sampling import decode as decode_module
from pdpo_jax.sampling import sampler as sampler_module

VOCAB = 97  # tests/hf_reference.py TINY
EOS = 1


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, VOCAB, n)] for n in lengths]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny GQA model (mistral family, no window) shared by the invariance tests."""
    folder = tmp_path_factory.mktemp("mistral")
    tiny_hf_model("mistral").save_pretrained(folder)
    return folder, from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Parity with transformers


HF_CASES = {"gpt2": dict(family="gpt2"), "llama": dict(family="llama"),
            "mistral_window": dict(family="mistral", sliding_window=5),
            "qwen2": dict(family="qwen2")}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_matches_hf_generate(case, tmp_path):
    """Left-padded prompts of different lengths, EOS on: same tokens, same stops, same log-probs."""
    spec = dict(HF_CASES[case])
    hf = tiny_hf_model(spec.pop("family"), seed=spec.pop("seed", 0), **spec)
    hf.save_pretrained(tmp_path)
    prompts, max_new = _prompts((9, 4, 6, 1), seed=2), 14
    want, want_logp = hf_greedy(hf, prompts, max_new, pad_id=0, eos_id=EOS)
    cfg = SamplingConfig(max_new, greedy=True, eos_ids=(EOS,), pad_id=0, logprobs=True)
    out = generate(from_pretrained(tmp_path), prompts, cfg)
    np.testing.assert_array_equal(out.tokens, want, err_msg=case)
    # Tiny random GPT-2s repeat one token; the per-step log-probs still differ step to step,
    # so comparing them checks every cache position. HF scores the pad after EOS; we give 0.
    inside = np.arange(max_new)[None] < out.lengths[:, None]
    np.testing.assert_allclose(out.logprobs[inside], want_logp[inside], atol=1e-4, err_msg=case)
    stopped = (want == EOS).any(axis=1)
    assert out.finish_reason == ["stop" if s else "length" for s in stopped]


@pytest.mark.real_model
def test_smollm2_chat_greedy_matches_hf(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)

    def chat(system, user):
        ids = tok.apply_chat_template([{"role": "system", "content": system},
                                       {"role": "user", "content": user}],
                                      add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    prompts = [chat("You are a friendly person who loves hiking and has two dogs.",
                    "hi ! what do you like to do on weekends ?"),
               chat("You are a helpful assistant.", "What is the capital of France?")]
    assert len(prompts[0]) != len(prompts[1])  # one row is left-padded
    eos = tok.eos_token_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    want, _ = hf_greedy(hf, prompts, 16, pad_id=eos, eos_id=eos)
    out = generate(from_pretrained(smollm2_dir), prompts,
                   SamplingConfig(16, greedy=True, eos_ids=(eos,), pad_id=eos))
    np.testing.assert_array_equal(out.tokens, want)
    assert "Paris" in tok.decode(out.tokens[1][:out.lengths[1]])


# --------------------------------------------------------------------------------------------
# Invariants against the model itself


def test_greedy_is_argmax_of_full_forward(llama):
    """Every greedy token is the argmax of a no-cache forward over prompt + tokens so far."""
    _, model = llama
    prompts, max_new = _prompts((7, 3)), 10
    out = generate(model, prompts, SamplingConfig(max_new, greedy=True, logprobs=True))
    full = [p + out.tokens[i].tolist() for i, p in enumerate(prompts)]
    tokens, mask = left_pad(full)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    steps = np.asarray(logits)[:, -max_new - 1:-1]  # predicts each of the new tokens
    np.testing.assert_array_equal(steps.argmax(-1), out.tokens)
    logp = np.asarray(jax.nn.log_softmax(steps, axis=-1))
    chosen = np.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out.logprobs, chosen, atol=2e-5)


def test_first_token_logits_ignore_left_padding(llama):
    _, model = llama
    sampler = Sampler(model, SamplingConfig(4, greedy=True))
    prefill = jax.jit(sampler.loop.prefill)
    prompt = _prompts((6,))[0]
    alone = prefill(sampler.weights, *left_pad([prompt]))[0]
    padded = prefill(sampler.weights, *left_pad([prompt, _prompts((40,), seed=1)[0]], length=64))[0]
    np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(alone[0]), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Filters on hand-made distributions


def _sorted_nucleus(probs, top_p):
    """Reference: stable sort (ties: lower id first), keep tokens whose preceding mass < top_p."""
    keep = np.zeros(probs.shape, bool)
    for row, p in enumerate(np.asarray(probs, np.float64)):
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep[row, order[before < top_p]] = True
    return keep


def test_top_p_keeps_smallest_set_with_ties():
    probs = jnp.asarray([[0.1, 0.4, 0.3, 0.2, 0.0],
                         [0.2, 0.3, 0.2, 0.2, 0.1],     # three tokens tied at 0.2
                         [0.25, 0.25, 0.25, 0.25, 0.0]], jnp.float32)
    # Row 1 at 0.65 needs 0.3 + two of the three 0.2s: ids 0 and 2, not 3. Row 2 at 0.75:
    # three quarters reach exactly 0.75 (exact in fp32), so the fourth is not needed.
    cases = {0.65: [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]],
             0.45: [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]],
             0.75: [[0, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]],
             0.05: [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]],
             0.95: [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]}
    for top_p, want in cases.items():
        got = np.asarray(jax.jit(top_p_mask)(probs, top_p))
        np.testing.assert_array_equal(got, np.asarray(want, bool), err_msg=f"top_p={top_p}")
        np.testing.assert_array_equal(got, _sorted_nucleus(probs, top_p), err_msg=f"top_p={top_p}")


def test_top_p_matches_sorted_reference_on_random_rows():
    """Wide and peaked rows, some with many exact ties (logits rounded to a coarse grid)."""
    key = jax.random.key(3)
    logits = jax.random.normal(key, (48, 500)) * jnp.linspace(0.3, 6.0, 48)[:, None]
    logits = logits.at[::3].set(jnp.round(logits[::3] * 2) / 2)
    probs = jax.nn.softmax(logits, axis=-1)
    for top_p in (0.3, 0.9, 0.99):
        np.testing.assert_array_equal(np.asarray(top_p_mask(probs, top_p)),
                                      _sorted_nucleus(probs, top_p))


def test_top_k_keeps_exactly_k_lowest_id_on_ties():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(np.asarray(top_k_mask(logits, 2)),
                                  [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
    filtered = filter_logits(logits, 1.0, top_k=1, top_p=1.0)
    assert np.isfinite(np.asarray(filtered)).sum() == 2


def test_draws_follow_filtered_softmax():
    """40k draws from fixed logits: frequencies match softmax(logits / T) on the nucleus.

    Chi-square with 7 (resp. kept-1) degrees of freedom; the 99.9 % quantile of chi2(7) is 24.3,
    so a correct sampler fails with probability 1e-3 for a random seed (and never for this
    fixed one); a wrong temperature or an off-by-one in the nucleus gives values in the hundreds.
    """
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    draws = 40_000
    keys = jax.random.split(jax.random.key(0), draws)
    for temperature, top_p in ((1.0, 1.0), (2.0, 1.0), (1.0, 0.8)):
        tokens = jax.jit(lambda k: sample_tokens(k, jnp.broadcast_to(logits, (draws, 8)),
                                                 greedy=False, temperature=temperature,
                                                 top_k=0, top_p=top_p))(keys)
        counts = np.bincount(np.asarray(tokens), minlength=8)
        probs = np.asarray(jax.nn.softmax(filter_logits(logits[None], temperature, 0, top_p)))[0]
        kept = probs > 0
        assert counts[~kept].sum() == 0
        expected = draws * probs[kept]
        assert np.sum((counts[kept] - expected) ** 2 / expected) < 24.3


def test_draw_from_never_draws_zero_weight_tokens():
    """Inverse-CDF draws: zero weights at the ends and inside are never drawn; one weight wins."""
    keys = jax.random.split(jax.random.key(3), 20_000)
    from pdpo_jax.sampling import draw_from
    for weights, allowed in (([0.0, 0.7, 0.0, 0.3, 0.0], {1, 3}), ([0.0, 0.0, 0.0, 2.5], {3}),
                             ([1e-30, 0.0, 1.0, 0.0], {0, 2})):
        w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (keys.shape[0], len(weights)))
        drawn = set(np.unique(np.asarray(jax.jit(draw_from)(keys, w))).tolist())
        assert drawn <= allowed  # never a zero weight
        assert {i for i, x in enumerate(weights) if x > 0.1} <= drawn  # every real weight drawn


def _chi2_quantile(k: int) -> float:
    """99.9 % quantile of chi2(k), Wilson-Hilferty: a correct sampler fails 1 in 1000 seeds."""
    return k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3


def _chi2(counts, probs) -> tuple[float, int]:
    """Pearson statistic of counts against probs (bins expecting < 5 merged) and its dof."""
    n = counts.sum()
    big = probs * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(probs[big], probs[~big].sum()) * n
    keep = expected > 0
    stat = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
    return float(stat), int(keep.sum() - 1)


def test_inverse_cdf_blocks_follow_the_weights():
    """Two-level inverse CDF over several blocks with a padded tail: whole zero blocks, zeros
    at block edges and a lone token in the last, padded block; 60k draws per row."""
    w = np.zeros((2, 300), np.float32)
    w[0, 3:120] = np.linspace(0.1, 2.0, 117)  # block 0 only, its edges zero
    w[0, 256] = 5.0                            # block 2 (padded to 384), block 1 all zero
    w[1, ::7] = np.arange(43) % 5             # every block, some zeros among the chosen
    w[1, 299] = 3.0                            # the last real token
    draws = 60_000
    u = jax.random.uniform(jax.random.key(5), (draws, 2))
    draw = jax.jit(jax.vmap(lambda u_B: filters.inverse_cdf(jnp.asarray(w), block=128)(u_B)))
    tokens = np.asarray(draw(u))
    for row in range(2):
        counts = np.bincount(tokens[:, row], minlength=300)
        assert counts[w[row] == 0].sum() == 0
        stat, dof = _chi2(counts, w[row] / w[row].sum())
        assert stat < _chi2_quantile(dof), (row, stat, dof)
    # u = 0 gives the first token of weight > 0; u just below 1 the last.
    edges = np.asarray(filters.inverse_cdf(jnp.asarray(w))(jnp.asarray([0.0, 0.0])))
    np.testing.assert_array_equal(edges, [3, 7])
    below_one = jnp.full(2, np.nextafter(np.float32(1.0), np.float32(0.0)))
    top = np.asarray(filters.inverse_cdf(jnp.asarray(w))(below_one))
    np.testing.assert_array_equal(top, [256, 299])


def test_in_nucleus_agrees_with_top_p_mask_at_every_token():
    """The rejection sampler's membership test equals the nucleus mask, ties included."""
    logits = jax.random.normal(jax.random.key(3), (24, 300)) * jnp.linspace(0.3, 6.0, 24)[:, None]
    logits = logits.at[::3].set(jnp.round(logits[::3] * 2) / 2)
    probs = jax.nn.softmax(logits, axis=-1)
    every = jax.jit(jax.vmap(lambda t, p: filters.in_nucleus(probs, jnp.full(24, t), p),
                             in_axes=(0, None), out_axes=1))
    for top_p in (0.3, 0.9, 0.99):
        np.testing.assert_array_equal(np.asarray(every(jnp.arange(300), top_p)),
                                      _sorted_nucleus(probs, top_p))


@pytest.mark.parametrize("attempts", [8, 1])
def test_nucleus_draws_follow_the_renormalised_nucleus(attempts):
    """Rejection draws, and (attempts=1, top_p=0.3: most rows rejected once) the exact
    fallback: never a token outside the nucleus (a tie at its edge left out by id), and
    frequencies match the nucleus renormalised."""
    probs = jnp.asarray([0.02, 0.2, 0.3, 0.2, 0.2, 0.08], jnp.float32)
    draws = 40_000
    keys = jax.random.split(jax.random.key(attempts), draws)
    for top_p in (0.3, 0.65, 0.97):
        batch = jnp.broadcast_to(probs, (draws, 6))
        tokens = jax.jit(lambda k: filters.draw_from_nucleus(k, batch, top_p, attempts))(keys)
        counts = np.bincount(np.asarray(tokens), minlength=6)
        kept = _sorted_nucleus(probs[None], top_p)[0]  # 0.65: ids 2, 1, 3 (not the tied 4)
        assert counts[~kept].sum() == 0, (top_p, counts)
        nucleus = np.where(kept, np.asarray(probs, np.float64), 0.0)
        stat, dof = _chi2(counts, nucleus / nucleus.sum())
        assert dof == 0 or stat < _chi2_quantile(dof), (top_p, stat, dof)


def test_first_token_of_model_follows_softmax(llama):
    """n=3000 samples of one prompt's first token vs softmax of the prefill logits.

    Bins with fewer than 5 expected draws are merged (the chi-square approximation needs it).
    The 99.9 % quantile of chi2(k) by Wilson-Hilferty: k * (1 - 2/(9k) + 3.09 sqrt(2/(9k)))^3.
    """
    _, model = llama
    n, prompt = 3000, _prompts((5,))
    out = generate(model, prompt, SamplingConfig(1, n=n, seed=7))
    sampler = Sampler(model, SamplingConfig(1))
    logits = jax.jit(sampler.loop.prefill)(sampler.weights, *left_pad(prompt))[0]
    probs = np.asarray(jax.nn.softmax(logits[0]), np.float64)
    counts = np.bincount(out.tokens[:, 0], minlength=VOCAB)
    big = probs * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(probs[big], probs[~big].sum()) * n
    k = len(observed) - 1
    quantile = k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3
    assert np.sum((observed - expected) ** 2 / expected) < quantile


# --------------------------------------------------------------------------------------------
# Sampling behaviour


def test_top_k_one_and_cold_temperature_equal_greedy(llama):
    _, model = llama
    prompts = _prompts((8, 5, 2))
    greedy = generate(model, prompts, SamplingConfig(8, greedy=True)).tokens
    for cfg in (SamplingConfig(8, top_k=1, seed=3), SamplingConfig(8, temperature=1e-6, seed=4)):
        np.testing.assert_array_equal(generate(model, prompts, cfg).tokens, greedy, err_msg=str(cfg))


def test_seeds_and_batch_neighbours(llama):
    """Same seed → same samples; another seed → others; a row ignores who shares its batch."""
    _, model = llama
    sampler = Sampler(model, SamplingConfig(12, top_p=0.95, temperature=1.3))
    prompts = _prompts((8, 5, 3))
    a = sampler.generate(prompts, seed=1).tokens
    np.testing.assert_array_equal(sampler.generate(prompts, seed=1).tokens, a)
    assert (sampler.generate(prompts, seed=2).tokens != a).mean() > 0.5
    neighbours = _prompts((7, 5, 2), seed=9)
    mixed = sampler.generate([neighbours[0], prompts[1], neighbours[2]], seed=1).tokens
    np.testing.assert_array_equal(mixed[1], a[1])
    # Same example id in a smaller batch, at another row and another prompt bucket width.
    alone = sampler.generate([prompts[1]], seed=1, example_ids=[1]).tokens
    np.testing.assert_array_equal(alone[0], a[1])


def test_forced_eos_sets_lengths_and_finish_reason(llama):
    _, model = llama
    prompts, max_new = _prompts((6, 4, 9)), 10
    free = generate(model, prompts, SamplingConfig(max_new, greedy=True)).tokens
    eos_ids = (int(free[0, 3]), int(free[1, 6]))
    out = generate(model, prompts, SamplingConfig(max_new, greedy=True, eos_ids=eos_ids, pad_id=0))
    for row in range(len(prompts)):
        hits = np.flatnonzero(np.isin(free[row], eos_ids))
        length = hits[0] + 1 if hits.size else max_new
        assert out.lengths[row] == length
        assert out.finish_reason[row] == ("stop" if hits.size else "length")
        np.testing.assert_array_equal(out.tokens[row, :length], free[row, :length])
        assert (out.tokens[row, length:] == 0).all()
    assert out.finish_reason[0] == "stop" and out.lengths[0] <= 4


def test_n_samples_per_prompt(llama):
    _, model = llama
    prompts = _prompts((5, 8))
    cfg = SamplingConfig(6, seed=5, logprobs=True)
    many = generate(model, prompts, SamplingConfig(6, seed=5, n=3, logprobs=True))
    assert many.tokens.shape == (6, 6) and many.logprobs.shape == (6, 6)
    one = generate(model, prompts, cfg)
    # Sample 0 of prompt i uses the same key whatever n is.
    np.testing.assert_array_equal(many.tokens[::3], one.tokens)
    assert (many.tokens[0] != many.tokens[1]).any() and (many.tokens[3] != many.tokens[4]).any()


def test_batch_of_one_and_bucketing_compiles_once(llama):
    _, model = llama
    sampler = Sampler(model, SamplingConfig(5, greedy=True, eos_ids=(EOS,)), prompt_bucket=16)
    before = sampler_module._run._cache_size()
    for length in (3, 9, 16):  # one bucket of 16
        out = sampler.generate(_prompts((length,)))
        assert out.tokens.shape == (1, 5) and len(out.finish_reason) == 1
    assert sampler_module._run._cache_size() == before + 1


def test_weights_are_laid_out_once_and_new_params_need_no_recompile(llama, tmp_path):
    """The sampler holds one decode layout, made at construction; `params=` (a policy after
    some training) samples as a sampler built on those weights, with the same program."""
    folder, model = llama
    cfg = SamplingConfig(6, top_p=0.9, logprobs=True)
    sampler = Sampler(model, cfg)
    layers = sampler.weights.params["layers"]
    assert len(layers) == model.cfg.num_layers
    np.testing.assert_array_equal(layers[1]["mlp"]["down_FD"][...], model.layers.mlp.down_FD[1])
    assert sampler.weights.head_DV.shape == (model.cfg.d_model, VOCAB)
    tiny_hf_model("mistral", seed=3).save_pretrained(tmp_path)
    other = from_pretrained(tmp_path)
    prompts = _prompts((4, 7))
    want = Sampler(other, cfg).generate(prompts)
    before = sampler_module._run._cache_size()
    got = sampler.generate(prompts, params=nnx.split(other)[1])
    assert sampler_module._run._cache_size() == before
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)
    assert (got.tokens != sampler.generate(prompts).tokens).any()  # not the sampler's own weights


def test_per_call_config_equals_a_sampler_built_with_it(llama):
    """`cfg=` per call (as vLLM's sampling params): the same weights, that config's samples."""
    _, model = llama
    sampler = Sampler(model, SamplingConfig(5, greedy=True))
    prompts = _prompts((3, 8))
    for cfg in (SamplingConfig(7, top_k=20, seed=4, n=2, logprobs=True, pad_id=2, eos_ids=(EOS,)),
                SamplingConfig(5, greedy=True)):
        want = Sampler(model, cfg).generate(prompts)
        got = sampler.generate(prompts, cfg=cfg)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        assert got.finish_reason == want.finish_reason
        np.testing.assert_array_equal(got.lengths, want.lengths)
        assert got.tokens.shape == (len(prompts) * cfg.n, cfg.max_new_tokens)
    assert sampler.generate(prompts).tokens.shape == (2, 5)  # the sampler's own config stays


def test_model_loaded_in_the_decode_layout_is_not_copied(llama):
    """`from_pretrained(stack_layers=False)` on a mesh: the sampler decodes with the loaded
    arrays themselves (one copy of the layers) and samples as from the stacked model."""
    folder, model = llama
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    loaded = from_pretrained(folder, mesh=mesh, rules=sharding.SAMPLING_RULES, stack_layers=False)
    assert decode_module.in_decode_layout(loaded) and not decode_module.in_decode_layout(model)
    cfg = SamplingConfig(6, top_p=0.9, logprobs=True)
    sampler = Sampler(loaded, cfg, mesh=mesh)
    q = loaded.layers[1].attn.q_DNH[...]
    assert sampler.weights.params["layers"][1]["attn"]["q_DNH"][...] is q
    assert q.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor", None)), q.ndim)
    prompts = _prompts((5, 9, 3))
    want = generate(model, prompts, cfg)
    got = sampler.generate(prompts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_sharded_sampling_equals_unsharded(llama):
    """(data=2, fsdp=2, tensor=2) on 8 fake CPU devices; a batch of 3 is padded to 4."""
    folder, model = llama
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(folder, mesh=mesh, rules=sharding.SAMPLING_RULES)
    prompts = _prompts((9, 4, 6))
    for cfg in (SamplingConfig(8, greedy=True, logprobs=True),
                SamplingConfig(8, top_p=0.9, top_k=30, n=2, logprobs=True, eos_ids=(EOS,))):
        want = generate(model, prompts, cfg)
        sampler = Sampler(sharded, cfg, mesh=mesh)
        got = sampler.generate(prompts)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    q = sampler.weights.params["layers"][0]["attn"]["q_DNH"][...]
    assert q.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor", None)), q.ndim)
    tokens, mask = left_pad(prompts + prompts[:1], length=32)
    args = sampler._place_batch(tokens, mask, np.ones(4, bool), np.arange(4, dtype=np.int32))
    state = sampler_module._run(sampler.loop, sampler.weights, *args, jnp.uint32(0))
    assert state.tokens_BS.sharding.spec[0] == ("data", "fsdp")


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_config_and_prompts_are_refused(llama):
    _, model = llama
    with pytest.raises(ValueError, match="greedy=True"):
        SamplingConfig(4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(4, top_p=0.0)
    assert SamplingConfig(4, eos_ids=2).eos_ids == (2,)
    sampler = Sampler(model, SamplingConfig(4, greedy=True))
    with pytest.raises(ValueError, match="left-padded"):
        sampler.sample(np.ones((1, 4), np.int32), np.asarray([[True, True, False, False]]))
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[3, 4], []])
    with pytest.raises(ValueError, match="vocab"):
        sampler.generate([[3, VOCAB]])
    with pytest.raises(ValueError, match="seed"):
        sampler.generate([[3, 4]], seed=-1)


def test_stop_ids_join_tokenizer_config_and_generation_config(tmp_path):
    import json
    import types

    from pdpo_jax.sampling import stop_ids
    tok = types.SimpleNamespace(eos_token_id=2)
    assert stop_ids(tok) == (2,)
    assert stop_ids(tok, [7, 2]) == (2, 7)
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [9, 7]}))
    assert stop_ids(tok, 7, gen) == (2, 7, 9)
    assert stop_ids(tok, 7, tmp_path / "missing.json") == (2, 7)
    assert stop_ids(types.SimpleNamespace(eos_token_id=None)) == ()
