"""The continuous-batching engine against independent references: HF `generate` (greedy), the
static sampler (every row, sampled too: same keys, same tokens), the training step's log-probs;
and its own invariants: a row never depends on its slot, batch or order, mixed settings share
one step, streaming, sharding, bad requests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_greedy, tiny_hf_model
from pdpo_jax import sharding
from pdpo_jax.models import from_pretrained
from pdpo_jax.sampling import Sampler, SamplingConfig
from pdpo_jax.sampling.engine import Engine, Request
from pdpo_jax.train.logprobs import response_logps

VOCAB, EOS = 97, 1


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, VOCAB, n)] for n in lengths]


LENGTHS = (9, 4, 31, 1, 17, 6, 12, 3, 25, 7, 2)  # one prompt bucket: few programs compile


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral")
    tiny_hf_model("mistral").save_pretrained(folder)
    return folder, from_pretrained(folder)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    prompts, max_new = _prompts((9, 4, 6, 1, 13), seed=2), 12
    want, want_logp = hf_greedy(hf, prompts, max_new, pad_id=0, eos_id=EOS)
    cfg = SamplingConfig(max_new, greedy=True, eos_ids=(EOS,), pad_id=0, logprobs=True)
    out = Engine(from_pretrained(tmp_path), cfg, slots=2).generate(prompts)
    np.testing.assert_array_equal(out.tokens, want)
    inside = np.arange(max_new)[None] < out.lengths[:, None]
    np.testing.assert_allclose(out.logprobs[inside], want_logp[inside], atol=1e-4)
    assert out.finish_reason == ["stop" if s else "length" for s in (want == EOS).any(axis=1)]


CONFIGS = {
    "greedy": SamplingConfig(10, greedy=True, eos_ids=(EOS, 5)),
    "top_p": SamplingConfig(10, top_p=0.8, temperature=1.3, eos_ids=(EOS, 5), seed=3, logprobs=True),
    "top_k_n2": SamplingConfig(8, top_k=5, eos_ids=(EOS,), n=2, seed=7),
    "plain": SamplingConfig(6, temperature=0.7),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_row_equals_the_static_sampler(mistral, name):
    """Same example ids, same keys: the same tokens, lengths, stops and log-probs, although the
    engine decodes 11 prompts in 4 slots in whatever order they free up."""
    _, model = mistral
    cfg, prompts = CONFIGS[name], _prompts(LENGTHS)
    want = Sampler(model, cfg).generate(prompts)
    got = Engine(model, cfg, slots=4, steps_per_call=3).generate(prompts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.finish_reason == want.finish_reason
    if cfg.logprobs:
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_rows_do_not_depend_on_slots_order_or_company(mistral):
    """A row's reply depends on its prompt and example id only: not on the slot count, the
    order prompts arrive in, or which other prompts share the engine."""
    _, model = mistral
    cfg = SamplingConfig(9, top_p=0.9, eos_ids=(EOS,), seed=11)
    prompts, ids = _prompts(LENGTHS, seed=5), [40 + i for i in range(len(LENGTHS))]
    base = Engine(model, cfg, slots=4).generate(prompts, example_ids=ids)
    order = np.random.default_rng(0).permutation(len(prompts))
    shuffled = Engine(model, cfg, slots=2, steps_per_call=1).generate(
        [prompts[i] for i in order], example_ids=[ids[i] for i in order])
    np.testing.assert_array_equal(shuffled.tokens, base.tokens[order])
    alone = Engine(model, cfg, slots=2).generate(prompts[3:5], example_ids=ids[3:5])
    np.testing.assert_array_equal(alone.tokens, base.tokens[3:5])


def test_reported_logprobs_equal_the_training_logprobs(mistral):
    """The log-prob the engine reports for each sampled token equals what the DPO step's
    `response_logps` computes for the same tokens after the prompt (fp32)."""
    _, model = mistral
    cfg = SamplingConfig(10, top_p=0.9, temperature=1.2, eos_ids=(EOS,), seed=2, logprobs=True)
    prompts = _prompts((9, 4, 14, 6), seed=9)
    out = Engine(model, cfg, slots=2).generate(prompts)
    T, R = 32, 10
    tokens, positions = np.zeros((4, T), np.int32), np.zeros((4, T), np.int32)
    attention, loss = np.zeros((4, T), bool), np.zeros((4, T), bool)
    for b, p in enumerate(prompts):
        reply = out.tokens[b, :out.lengths[b]]
        row = np.concatenate([p, reply])
        tokens[b, :len(row)], positions[b, :len(row)] = row, np.arange(len(row))
        attention[b, :len(row)], loss[b, len(p):len(row)] = True, True
    logp, valid = response_logps(model, *map(jnp.asarray, (tokens, positions, attention, loss)),
                                 window=R)
    logp, valid = np.asarray(logp), np.asarray(valid)
    for b in range(4):
        n = out.lengths[b]
        assert valid[b].sum() == n
        np.testing.assert_allclose(out.logprobs[b, :n], logp[b, :n], atol=2e-5, rtol=1e-5)


def test_requests_with_different_settings_share_one_step(mistral):
    """Greedy, top-k, top-p and plain requests decoded together in one scheduler: each equals
    what an engine given only its own settings produces."""
    _, model = mistral
    prompts = _prompts((5, 11, 3, 8), seed=4)
    settings = [dict(greedy=True), dict(top_k=4, temperature=0.8), dict(top_p=0.7),
                dict(temperature=1.5)]
    engine = Engine(model, SamplingConfig(8, top_k=4, eos_ids=(EOS,)), slots=4)
    scheduler = engine.scheduler(cache_len=32 + 8)
    requests = [Request(p, 8, example_id=i, seed=1, **s) for i, (p, s) in enumerate(zip(prompts, settings))]
    for r in requests:
        scheduler.submit(r)
    while scheduler.busy:
        scheduler.step()
    for i, (r, s) in enumerate(zip(requests, settings)):
        alone = Engine(model, SamplingConfig(8, eos_ids=(EOS,), seed=1, **s), slots=2).generate(
            [prompts[i]], example_ids=[i])
        assert r.tokens == alone.tokens[0, :alone.lengths[0]].tolist(), s
        assert r.finish_reason == alone.finish_reason[0]


def test_streaming_delivers_every_token_once_in_order(mistral):
    _, model = mistral
    engine = Engine(model, SamplingConfig(12, eos_ids=(EOS,), seed=3), slots=2, steps_per_call=2)
    scheduler = engine.scheduler(cache_len=64)
    seen: dict[int, list[int]] = {}
    requests = [Request(p, 12, example_id=i, on_tokens=lambda r, t: seen.setdefault(r.example_id, []).extend(t))
                for i, p in enumerate(_prompts((6, 9, 4), seed=1))]
    for r in requests:
        scheduler.submit(r)
    while scheduler.busy:
        scheduler.step()
    for r in requests:
        assert seen[r.example_id] == r.tokens and len(r.tokens) >= 1


def test_continuous_batching_keeps_slots_busy(mistral):
    """Replies of very different lengths: the engine spends fewer slot-steps than a static batch
    of the same rows, which runs every row to the longest."""
    _, model = mistral
    prompts = _prompts((4,) * 16, seed=3)
    cfg = SamplingConfig(20, greedy=True)
    engine = Engine(model, cfg, slots=4, prompt_bucket=8)
    scheduler = engine.scheduler(cache_len=4 + 20)
    budgets = [2, 20, 3, 4] * 4
    for i, (p, m) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Request(p, m, example_id=i, greedy=True))
    while scheduler.busy:
        scheduler.step()
    useful = sum(budgets) - len(budgets)  # the first token of each row comes from its prefill
    assert scheduler.useful_steps == useful
    static_slot_steps = len(budgets) // 4 * 4 * (max(budgets) - 1)  # 4 batches of 4, to 20 tokens
    assert scheduler.slot_steps < static_slot_steps


def test_sharded_engine_equals_unsharded(mistral):
    """(data=2, fsdp=2, tensor=2) on 8 fake CPU devices."""
    folder, model = mistral
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(folder, mesh=mesh, rules=sharding.SAMPLING_RULES)
    cfg = SamplingConfig(8, top_p=0.9, top_k=30, eos_ids=(EOS,), logprobs=True)
    prompts = _prompts((9, 4, 6, 13, 2))
    want = Engine(model, cfg, slots=4).generate(prompts)
    engine = Engine(sharded, cfg, slots=4, mesh=mesh)
    got = engine.generate(prompts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    q = engine.weights.params["layers"][0]["attn"]["q_DNH"][...]
    assert q.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor", None)), q.ndim)
    with pytest.raises(ValueError, match="multiple of data\\*fsdp = 4"):
        Engine(sharded, cfg, slots=6, mesh=mesh)


def test_bad_requests_are_refused(mistral):
    _, model = mistral
    engine = Engine(model, SamplingConfig(8, top_k=3), slots=2, prompt_bucket=8)
    scheduler = engine.scheduler(cache_len=24)
    for request, message in [(Request([], 4), "at least one token"),
                             (Request([3] * 21, 4), "exceeds the engine's 24-token context"),
                             (Request([3] * 23, 2), "exceeds the engine's 24-token context"),
                             (Request([3], 9), "max_new=9 must be in \\[1, 8\\]"),
                             (Request([3], 4, top_k=4), "top_k=4 exceeds"),
                             (Request([3], 4, seed=-1), "seed")]:
        with pytest.raises(ValueError, match=message):
            scheduler.submit(request)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[3], []])


def test_short_and_long_prompts_admitted_together_keep_their_prompts(mistral):
    """A short prompt padded to a long one's width in the same admission, in a ring only as long
    as each row needs (prompt + budget): its reply still equals the static sampler's."""
    _, model = mistral
    prompts = _prompts((2, 30, 3), seed=8)
    cfg = SamplingConfig(6, greedy=True)
    engine = Engine(model, cfg, slots=4, prompt_bucket=8)
    scheduler = engine.scheduler(cache_len=32 + 6)
    requests = [Request(p, 6, example_id=i, greedy=True) for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.submit(r)
    while scheduler.busy:
        scheduler.step()
    want = Sampler(model, cfg).generate(prompts)
    assert [r.tokens for r in requests] == [want.tokens[i, :want.lengths[i]].tolist() for i in range(3)]


def test_a_prompt_budget_keeps_one_set_of_programs_across_calls(mistral):
    """Calls whose longest prompts differ (shards, rollouts) size the ring by the caller's
    budget: the decode program compiles once, not once per call, and the replies are those a
    call sized by its own prompts draws."""
    from pdpo_jax.sampling import engine as engine_mod
    _, model = mistral
    cfg = SamplingConfig(6, top_p=0.9, eos_ids=(EOS,), seed=3)
    engine = Engine(model, cfg, slots=4)
    calls = [_prompts((5, 9), seed=1), _prompts((40, 3), seed=2), _prompts((70, 8), seed=3)]
    start = engine_mod._decode._cache_size()
    own = [engine.generate(p, example_ids=[10 * k, 10 * k + 1]) for k, p in enumerate(calls)]
    after_own = engine_mod._decode._cache_size()
    assert after_own == start + 3  # rings of 32, 64 and 96 prompt columns
    budget = [engine.generate(p, example_ids=[10 * k, 10 * k + 1], max_prompt_len=100)
              for k, p in enumerate(calls)]
    assert engine_mod._decode._cache_size() == after_own + 1  # one ring (128 columns) for all
    for a, b in zip(own, budget):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="exceeds max_prompt_len=100"):
        engine.generate(_prompts((101,)), max_prompt_len=100)


def test_budget_prefill_compiles_one_admit_program_per_batch_size(mistral):
    """prefill='budget' pads every admitted batch to the caller's prompt budget: in fp32 the
    same replies as 'tight' (each batch padded to its longest prompt), with one admit program
    per batch size instead of one per batch size and width bucket."""
    from pdpo_jax.sampling import engine as engine_mod
    _, model = mistral
    cfg = SamplingConfig(5, top_p=0.9, eos_ids=(EOS,), seed=7)
    # every row decodes all 5 tokens, so prompts are admitted 4 at a time, then the last alone:
    # tight widths 32, 64, 96 and 32; the budget's width is 128
    prompts = _prompts((3, 20, 9, 12, 40, 15, 50, 2, 70, 5, 95, 27, 10), seed=9)

    def run(prefill):
        start = engine_mod._admit._cache_size()
        out = Engine(model, cfg, slots=4, prefill=prefill).generate(prompts, max_prompt_len=100)
        return out, engine_mod._admit._cache_size() - start

    tight, tight_programs = run("tight")
    budget, budget_programs = run("budget")
    np.testing.assert_array_equal(budget.tokens, tight.tokens)
    assert (budget_programs, tight_programs) == (2, 4)
    with pytest.raises(ValueError, match="prefill='fast'"):
        Engine(model, cfg, prefill="fast")
