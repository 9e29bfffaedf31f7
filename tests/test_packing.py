"""Packed training batches: several records (SFT) or pairs (DPO) per row, each its own segment
group. The same loss, metrics and updates as one row per example (to fp32 summation order),
with gradient accumulation, sharded, from the data loader, and after a resume."""
import jax
import numpy as np
import pytest
from flax import nnx

from pdpo_jax import data as pdata
from pdpo_jax import sharding
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.models import ModelConfig
from pdpo_jax.models.attention import segment_id
from pdpo_jax.models.layers import frozen_forward_params
from pdpo_jax.train import optim, state as st
from pdpo_jax.train.loop import micro_batches
from pdpo_jax.train.steps import DpoObjective, make_dpo_step, make_sft_step

CFG = ModelConfig(arch="llama", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, max_positions=128)
# Adam's sqrt(v) + eps with a tiny eps turns rounding noise in near-zero gradient entries into
# O(lr) updates; a well-conditioned eps lets the params after a step be compared (as in
# tests/test_train_steps.py).
OPT = OptimizerConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", eps=1e-3)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [pdata.Encoded(rng.integers(2, 64, rng.integers(2, 24)).astype(np.int32),
                          rng.integers(2, 64, rng.integers(1, 10)).astype(np.int32))
            for _ in range(n)]


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [pdata.EncodedPair(rng.integers(2, 64, rng.integers(2, 24)).astype(np.int32),
                              rng.integers(2, 64, rng.integers(1, 10)).astype(np.int32),
                              rng.integers(2, 64, rng.integers(1, 10)).astype(np.int32))
            for _ in range(n)]


def _train(batches, kind, mesh_shape=(1, 1, 1), A=1, share_prompt=False, steps=2):
    """Losses/metrics per step and the final params of `steps` SFT or DPO steps."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    graphdef, params = st.init_params(CFG, mesh, seed=0)
    tx, lr = optim.make_optimizer(OPT, 10)
    state, state_sh = st.create_state(params, tx, mesh)
    if kind == "sft":
        step = st.jit_sft_step(make_sft_step(graphdef, tx, lr, window=12, chunk=8), state_sh, mesh)
        run = lambda s, b: step(s, b)  # noqa: E731
    else:
        ref = frozen_forward_params(nnx.merge(graphdef, state.params))
        dpo = make_dpo_step(graphdef, tx, lr, DpoObjective(), window=12, chunk=8,
                            share_prompt=share_prompt)
        step = st.jit_dpo_step(dpo, state_sh, mesh)
        run = lambda s, b: step(s, ref, b)  # noqa: E731
    history = []
    for i in range(steps):
        state, metrics = run(state, st.shard_batch(micro_batches(batches[i % len(batches)], A), mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return history, jax.device_get(state.params)


def _close(a, b, rtol=2e-5, atol=2e-6):
    ha, pa = a
    hb, pb = b
    for x, y in zip(ha, hb):
        assert x.keys() == y.keys()
        for k in x:
            if k not in ("tokens_per_s",):
                np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), pa, pb)


@pytest.mark.parametrize("A", [1, 2])
def test_packed_sft_equals_one_row_per_record(A):
    records = _records(8)
    unpacked = [pdata.sft_batch(records, 40, 0)]
    packed = [pdata.packed_batch(records, 64, 0, micro_batches=A)]
    assert packed[0]["tokens"].shape[0] < 8  # several records per row
    _close(_train(unpacked, "sft", A=A), _train(packed, "sft", A=A))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_dpo_equals_unpacked(share_prompt):
    """Pairs packed side by side ([p | c | r] groups) against one row per pair, with the
    shared prompt and without: loss, every trl metric and the updated params."""
    pairs = _pairs(8, seed=1)
    unpacked = [pdata.preference_batch(pairs, 40, 0)]
    packed = [pdata.packed_batch(pairs, 96, 0, micro_batches=2)]
    assert packed[0]["tokens"].shape[0] < 8
    _close(_train(unpacked, "dpo", A=2, share_prompt=share_prompt), _train(packed, "dpo", A=2))


def test_sharded_packed_steps_equal_one_device():
    """(data=2, fsdp=2, tensor=2): the rows, and each pair's sums, cross devices."""
    records, pairs = _records(8, seed=2), _pairs(8, seed=3)
    sft = [pdata.packed_batch(records, 48, 0, row_multiple=4)]
    dpo = [pdata.packed_batch(pairs, 64, 0, row_multiple=4)]
    _close(_train(sft, "sft"), _train(sft, "sft", mesh_shape=(2, 2, 2)), rtol=1e-4, atol=1e-5)
    _close(_train(dpo, "dpo"), _train(dpo, "dpo", mesh_shape=(2, 2, 2)), rtol=1e-4, atol=1e-5)


def test_rows_layout_and_first_fit():
    records = _records(6, seed=4)
    batch = pdata.packed_batch(records + [None, None], 64, 0)
    seg, owner, pred, target = (batch[k] for k in ("segments", "owner", "pred", "target"))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert batch["examples"].tolist() == [True] * 6 + [False] * 2
    assert (seg > 0).sum() == sum(r.length for r in records)  # every token once, nothing else
    for slot, r in enumerate(records):
        rows, cols = np.nonzero((owner == slot) & batch["valid"])
        assert len(set(rows)) == 1 and len(cols) == len(r.response_ids)  # a record stays whole
        b = rows[0]
        np.testing.assert_array_equal(batch["tokens"][b, target[b, cols]], r.response_ids)
        assert (pred[b, cols][1:] == target[b, cols][:-1]).all()
        start = target[b, cols[0]] - len(r.prompt_ids)
        np.testing.assert_array_equal(batch["positions"][b, start:start + r.length], np.arange(r.length))
        assert len(set(seg[b, start:start + r.length])) == 1 and seg[b, start] % 64 == 0
    assert pdata.packing.first_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="raise data.pack_length"):
        pdata.packing.first_fit([9], 8)
    assert segment_id(2, 1) == 129


def test_every_packed_batch_of_an_epoch_has_the_same_shapes():
    """Rows and scored columns are the epoch's largest needs, so one program serves the epoch:
    here batches of short pairs (one row, ~40 scored tokens) and of long ones (~240 scored
    tokens per row) alternate, and each shape change would compile another training step."""
    short = [pdata.EncodedPair(np.full(10, 3, np.int32), np.full(5, 4, np.int32),
                               np.full(5, 5, np.int32)) for _ in range(16)]
    long = [pdata.EncodedPair(np.full(100, 3, np.int32), np.full(60, 4, np.int32),
                              np.full(60, 5, np.int32)) for _ in range(16)]
    batches = pdata.preference_batches(short + long, batch_size=4, pad_id=0, buckets=(32, 256),
                                       packing=pdata.Packing(512), process_index=0, process_count=1)
    shapes = {tuple((k, v.shape) for k, v in sorted(batches[k].items())) for k in range(len(batches))}
    assert len(shapes) == 1, shapes
    want = pdata.packing.packed_needs(long[:4], 512)
    assert want == (2, 240)  # two long pairs (220 tokens) a row, each scoring 60 + 60 reply tokens
    assert dict(next(iter(shapes)))["target"] == (2, 256)


def test_loader_packs_the_same_examples_and_resumes():
    """The packed stream holds each step's same examples as the unpacked one (its `index`)
    with less padding, and an iterator restored from its state continues identically."""
    records = _records(64, seed=5)
    kw = dict(batch_size=16, pad_id=0, buckets=(32, 64), seed=3, process_index=0, process_count=1,
              num_epochs=None)
    plain = pdata.sft_batches(records, **kw).iterator()
    packed_stream = pdata.sft_batches(records, packing=pdata.Packing(64, micro_batches=2), **kw)
    packed = packed_stream.iterator()
    real = size_plain = size_packed = 0
    shapes = set()
    for _ in range(8):
        a, b = next(plain), next(packed)
        shapes.add(b["tokens"].shape)
        assert a["index"].tolist() == b["index"].tolist()
        assert int((b["segments"] > 0).sum()) == int(a["attention_mask"].sum())
        real += int(a["attention_mask"].sum())
        size_plain, size_packed = size_plain + a["tokens"].size, size_packed + b["tokens"].size
    assert len(shapes) == 1  # one row count for the epoch: one compiled step
    assert real / size_packed > 0.7 and real / size_plain < 0.6  # padding: < 30% vs > 40%
    state = packed.get_state()
    want = [next(packed)["index"].tolist() for _ in range(3)]
    again = packed_stream.iterator()
    again.set_state(state)
    assert [next(again)["index"].tolist() for _ in range(3)] == want
