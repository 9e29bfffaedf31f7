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


@pytest.mark.parametrize("kind", ["sft", "preference"])
@pytest.mark.parametrize("packing", [None, pdata.Packing(64, micro_batches=2)])
def test_epoch_shapes_are_the_collated_global_shapes(kind, packing):
    """`Batches.epoch_shapes` (from the plan, nothing collated) = the rows of every host's
    collated batch put together, and their width, on two hosts."""
    examples = _records(96, seed=2) if kind == "sft" else _pairs(96, seed=2)
    build = pdata.sft_batches if kind == "sft" else pdata.preference_batches
    key = "tokens" if kind == "sft" or packing else "chosen_tokens"
    kw = dict(batch_size=8, pad_id=0, buckets=(16, 32, 64), seed=1, process_count=2, packing=packing)
    hosts = [build(examples, process_index=h, **kw) for h in (0, 1)]
    want = []
    for k in range(hosts[0].batches_per_epoch):
        shapes = [b[k][key].shape for b in hosts]
        assert shapes[0] == shapes[1]
        want.append((2 * shapes[0][0], shapes[0][1]))
    assert hosts[0].epoch_shapes() == want


class _Ctx:
    """What `stages.choose_packing` reads of a run context."""

    def __init__(self, tmp_path, packing, share_prompt=True):
        from pdpo_jax.config import load_config
        cfg = load_config(None, (f"data.packing={packing}", "data.buckets=[32,64]",
                                 "data.max_total_tokens=64", "data.max_response_tokens=12",
                                 f"dpo.share_prompt={str(share_prompt).lower()}"))
        self.cfg, self.mesh, self.run_dir = cfg, None, tmp_path
        self.tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()

    def stage_dir(self, name):
        (self.run_dir / name).mkdir(exist_ok=True)
        return self.run_dir / name


def _slots(batches, key, extra=0):
    return sum(batches[k][key].shape[0] * (batches[k][key].shape[1] + extra)
               for k in range(batches.batches_per_epoch))


def test_auto_packing_takes_the_layout_with_fewer_slots_then_fewer_programs(tmp_path):
    """data.packing: auto packs short records (8 tokens: a batch's eight share one 64-token row,
    where a bucket pads each to 32), keeps buckets for records that fill their bucket (packed
    rows then pad to the epoch's fullest batch), and between the two (slots within 10%) takes
    the layout with fewer compiled shapes: the counts re-derived here from collated batches;
    layout.json records them; true / false are obeyed."""
    import json

    from pdpo_jax.config import load_config
    from pdpo_jax.train import stages
    stage = load_config(None).sft
    short = [pdata.Encoded(np.full(5, 3, np.int32), np.full(3, 4, np.int32)) for _ in range(64)]
    full = [pdata.Encoded(np.full(52, 3, np.int32), np.full(12, 4, np.int32)) if i % 2 else
            pdata.Encoded(np.full(20, 3, np.int32), np.full(12, 4, np.int32)) for i in range(64)]
    # one batch of 30-token records (bucket 32) and seven of 33 (bucket 64, one a row packed):
    # buckets 7 x 512 + 256 slots, packed 8 x 512, within 10%; buckets compile two shapes
    mixed = [pdata.Encoded(np.full(20 if i < 8 else 23, 3, np.int32), np.full(10, 4, np.int32))
             for i in range(64)]
    seen = set()
    for records in (short, full, mixed):
        ctx = _Ctx(tmp_path, "auto")
        got = stages.choose_packing(ctx, "sft", records, stage, pairs=False)
        layout = json.loads((tmp_path / "sft" / "layout.json").read_text())
        kw = dict(batch_size=stage.batch_size, pad_id=0, buckets=(32, 64), seed=ctx.cfg.run.seed,
                  process_index=0, process_count=1)
        bucketed = pdata.sft_batches(records, **kw)
        packed = pdata.sft_batches(records, packing=pdata.Packing(64), **kw)
        slots = {"buckets": _slots(bucketed, "tokens"), "packed": _slots(packed, "tokens")}
        programs = {name: len({b[k]["tokens"].shape for k in range(b.batches_per_epoch)})
                    for name, b in (("buckets", bucketed), ("packed", packed))}
        if slots["packed"] <= 0.9 * slots["buckets"]:
            want = True
        elif slots["buckets"] <= 0.9 * slots["packed"]:
            want = False
        else:
            want = programs["packed"] < programs["buckets"]
        assert got is want
        assert {k: layout[k] for k in ("chosen", "token_slots", "programs")} == {
            "chosen": "packed" if want else "buckets", "token_slots": slots, "programs": programs}
        seen.add(layout["why"] + ("/packed" if want else "/buckets"))
    assert seen == {"fewer token slots/packed", "fewer token slots/buckets",
                    "token slots within 10%: fewer programs/packed"}
    for setting in (True, False):
        assert stages.choose_packing(_Ctx(tmp_path, setting), "sft", full, stage, pairs=False) is setting
    from pdpo_jax.run_report import _layouts
    table = "\n".join(_layouts(tmp_path))  # the last auto choice: `mixed`
    assert (f"| sft | packed | token slots within 10%: fewer programs | {slots['packed']:,} | "
            f"{slots['buckets']:,} | {programs['packed']} / {programs['buckets']} |") in table


@pytest.mark.parametrize("share_prompt", [True, False])
def test_auto_packing_counts_dpo_rows_as_the_step_runs_them(tmp_path, share_prompt):
    """A bucketed pair runs as one [prompt | chosen | rejected] row of T + max_response_tokens
    (dpo.share_prompt) or as two rows of T; packed pairs as their rows of 2 x 64 tokens."""
    from pdpo_jax.config import load_config
    from pdpo_jax.train import stages
    ctx, stage = _Ctx(tmp_path, "auto", share_prompt), load_config(None).dpo
    pairs = _pairs(48, seed=6)
    kw = dict(batch_size=stage.batch_size, pad_id=0, buckets=(32, 64), seed=ctx.cfg.run.seed,
              process_index=0, process_count=1)
    bucketed = pdata.preference_batches(pairs, **kw)
    want = (_slots(bucketed, "chosen_tokens", extra=12) if share_prompt
            else 2 * _slots(bucketed, "chosen_tokens"))
    assert stages.layout_slots(ctx, bucketed, pairs=True, packed=False) == want
    packed = pdata.preference_batches(pairs, packing=pdata.Packing(128), **kw)
    assert stages.layout_slots(ctx, packed, pairs=True, packed=True) == _slots(packed, "tokens")


def test_packed_owners_index_the_global_batch_on_several_hosts():
    """Each host packs its own slice of a global batch; put together as `shard_batch` does
    (rows, `examples` and `owner` concatenated per micro-batch), `owner_sums` must give every
    pair its own chosen and rejected sums. Here a token's "log-prob" is its id (the token at its
    target column), so each pair's sums are the sums of its reply ids, read off the encoded
    pairs. Before owners were offset per host, host 1's pairs summed into host 0's slots."""
    import jax.numpy as jnp

    from pdpo_jax.train.logprobs import owner_sums
    from pdpo_jax.train.loop import micro_batches as split
    pairs, A, hosts = _pairs(64, seed=8), 2, 2
    kw = dict(batch_size=16, pad_id=0, buckets=(64,), seed=2, process_count=hosts,
              packing=pdata.Packing(128, micro_batches=A))
    raw = [pdata.preference_batches(pairs, process_index=h, **kw)[0] for h in range(hosts)]
    parts = [split(b, A) | {"index": b["index"].reshape(A, -1)} for b in raw]
    for m in range(A):
        glob = {k: np.concatenate([p[k][m] for p in parts])
                for k in ("tokens", "target", "valid", "owner", "side", "index")}
        ids = np.take_along_axis(glob["tokens"], glob["target"], axis=1)
        sums, counts = owner_sums(jnp.asarray(ids, jnp.float32), glob["valid"], glob["owner"],
                                  glob["side"], glob["index"].shape[0])
        for slot, i in enumerate(glob["index"]):
            e = pairs[i]
            assert np.asarray(sums[slot]).tolist() == [float(e.chosen_ids.sum()), float(e.rejected_ids.sum())]
            assert np.asarray(counts[slot]).tolist() == [len(e.chosen_ids), len(e.rejected_ids)]
