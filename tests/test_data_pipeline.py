"""Batch layouts and grain pipelines: determinism, epochs, buckets, host sharding, resume."""
import json

import numpy as np
import pytest

import pdpo_jax.data as D

BUCKETS = (16, 32, 64, 128)


def _examples(n=203, seed=0):
    """Encodings with distinct token values, so every row can be traced back to its example."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        ids = np.arange(p + r, dtype=np.int32) + 1000 * (i + 1)
        out.append(D.Encoded(ids[:p], ids[p:]))
    return out


def _pairs(n=50, seed=1):
    rng = np.random.default_rng(seed)
    return [D.EncodedPair(np.full(rng.integers(1, 30), i + 1, np.int32),
                          np.full(rng.integers(1, 40), -(i + 1), np.int32),
                          np.full(rng.integers(1, 40), -(i + 1) - 5000, np.int32)) for i in range(n)]


def _example_of(row_tokens):
    return int(row_tokens[0]) // 1000 - 1


def _sft(examples, **kwargs):
    kwargs = {"batch_size": 8, "pad_id": 0, "buckets": BUCKETS, "process_index": 0,
              "process_count": 1, **kwargs}
    return D.sft_batches(examples, **kwargs)


def _rows(batch):
    return [_example_of(t) for t, m in zip(batch["tokens"], batch["attention_mask"]) if m.any()]


def test_sft_layout_invariants():
    examples = _examples()
    batch = _sft(examples)[0]
    assert set(batch) == {"tokens", "positions", "attention_mask", "loss_mask", "index"}
    for row, i in enumerate(batch["index"]):  # index names the example each row holds
        n = examples[i].length
        np.testing.assert_array_equal(batch["tokens"][row, :n], examples[i].tokens)
    assert batch["tokens"].dtype == np.int32 and batch["positions"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool and batch["loss_mask"].dtype == bool
    for b in range(batch["tokens"].shape[0]):
        ex = examples[_example_of(batch["tokens"][b])]
        n, p = ex.length, len(ex.prompt_ids)
        np.testing.assert_array_equal(batch["tokens"][b, :n], ex.tokens)
        t = batch["tokens"].shape[1]
        np.testing.assert_array_equal(batch["positions"][b], np.r_[np.arange(n), np.zeros(t - n)])
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, :n].all()
        assert batch["loss_mask"][b].sum() == n - p and batch["loss_mask"][b, p:n].all()


def test_preference_layout_shares_t_and_prompt():
    pairs = _pairs()
    batches = D.preference_batches(pairs, batch_size=4, pad_id=0, buckets=BUCKETS, process_index=0,
                                   process_count=1)
    batch = batches[0]
    assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape
    for b in range(4):
        i = int(batch["chosen_tokens"][b, 0]) - 1
        pair = pairs[i]
        p = len(pair.prompt_ids)
        np.testing.assert_array_equal(batch["chosen_tokens"][b, :p], batch["rejected_tokens"][b, :p])
        assert batch["chosen_loss_mask"][b].sum() == len(pair.chosen_ids)
        assert batch["rejected_loss_mask"][b].sum() == len(pair.rejected_ids)
        assert batch["chosen_tokens"].shape[1] == D.bucket_length(
            max(pairs[int(t[0]) - 1].length for t in batch["chosen_tokens"]), BUCKETS)


def test_prompt_batches_are_left_padded_in_order_with_index():
    examples = _examples(n=21)
    batches = D.prompt_batches(examples, batch_size=8, pad_id=7, buckets=BUCKETS, process_index=0,
                               process_count=1)
    assert len(batches) == 3
    last = batches[2]
    np.testing.assert_array_equal(last["index"], [16, 17, 18, 19, 20, -1, -1, -1])
    for b, i in enumerate(last["index"]):
        tokens, pos, mask = last["tokens"][b], last["positions"][b], last["attention_mask"][b]
        if i < 0:
            assert not mask.any() and (tokens == 7).all()
            continue
        p = len(examples[i].prompt_ids)
        np.testing.assert_array_equal(tokens[-p:], examples[i].prompt_ids)
        np.testing.assert_array_equal(pos[-p:], np.arange(p))
        assert mask[-p:].all() and not mask[:-p].any() and not pos[:-p].any()


def test_same_seed_same_batches_other_epoch_other_order():
    examples = _examples()
    a, b = _sft(examples, num_epochs=2), _sft(examples, num_epochs=2)
    n = a.batches_per_epoch
    assert n == len(examples) // 8 and len(a) == 2 * n
    for k in (0, 5, n + 3):
        for key in a[k]:
            np.testing.assert_array_equal(a[k][key], b[k][key])
    epoch0 = [_rows(a[k]) for k in range(n)]
    epoch1 = [_rows(a[k]) for k in range(n, 2 * n)]
    assert epoch0 != epoch1
    assert _rows(_sft(examples, seed=1)[0]) != epoch0[0]
    # Each epoch uses distinct examples; drop_remainder leaves out fewer than one batch.
    for epoch in (epoch0, epoch1):
        flat = [i for rows in epoch for i in rows]
        assert len(flat) == len(set(flat)) == len(examples) - len(examples) % 8


def test_eval_order_covers_everything_once():
    examples = _examples()
    batches = _sft(examples, shuffle=False, drop_remainder=False)
    flat = [i for k in range(len(batches)) for i in _rows(batches[k])]
    assert flat == list(range(len(examples)))
    last = batches[len(batches) - 1]
    assert not last["loss_mask"][len(examples) % 8:].any()


def test_bucket_shapes_only_from_the_bucket_list():
    examples = _examples(n=400)
    batches = _sft(examples, num_epochs=2)
    shapes = {batches[k]["tokens"].shape for k in range(len(batches))}
    assert {t for _, t in shapes} <= set(BUCKETS) and {b for b, _ in shapes} == {8}
    # Grouping by bucket: most batches are padded to the bucket of their examples.
    waste = [1 - batches[k]["attention_mask"].mean() for k in range(len(batches))]
    assert np.median(waste) < 0.5
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        _sft(examples, buckets=(16, 64))


def test_host_shards_partition_each_global_batch():
    examples = _examples()
    whole = _sft(examples, num_epochs=2)
    hosts = [_sft(examples, num_epochs=2, process_index=p, process_count=2) for p in range(2)]
    seen = []
    for k in range(len(whole)):
        parts = [h[k] for h in hosts]
        assert parts[0]["tokens"].shape == parts[1]["tokens"].shape == (4, whole[k]["tokens"].shape[1])
        for key in whole[k]:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[k][key])
        rows = [_rows(p) for p in parts]
        assert not set(rows[0]) & set(rows[1])
        seen += rows[0] + rows[1]
    assert sorted(seen) == sorted(i for k in range(len(whole)) for i in _rows(whole[k]))
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _sft(examples, process_index=0, process_count=3)


def test_iterator_state_round_trips_through_json():
    examples = _examples()
    batches = _sft(examples, num_epochs=None)
    it = batches.iterator()
    for _ in range(batches.batches_per_epoch + 2):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    restored = _sft(examples, num_epochs=None).iterator()
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(4))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    other = _sft(examples, num_epochs=None, seed=3).iterator()
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        other.set_state(state)


def test_real_data_end_to_end(shared_dir, gpt2_tok):
    tok = gpt2_tok
    records = D.read_fbdialog(shared_dir / "data/personachat/valid_self_original_no_cands.txt.gz")[:200]
    encoded, stats = D.encode_records(tok, "english", records, max_total_tokens=256)
    assert stats.kept == 200
    batches = D.sft_batches(encoded, batch_size=16, pad_id=D.pad_id(tok), process_index=0, process_count=1)
    batch = next(batches.iterator())
    row = batch["tokens"][0][batch["attention_mask"][0]]
    text = tok.decode(row)
    assert text.startswith("Your persona:\n- ") and text.endswith("<|endoftext|>")
    target = tok.decode(batch["tokens"][0][batch["loss_mask"][0]])
    assert "\nYou:" + target[:-len("<|endoftext|>")] in text
    pairs = [D.PreferencePair(r.persona, r.history, r.response, "i do not know .") for r in records[:40]]
    enc_pairs, _ = D.encode_records(tok, "english", pairs, max_total_tokens=256)
    pref = D.preference_batches(enc_pairs, batch_size=8, pad_id=D.pad_id(tok), process_index=0,
                                process_count=1)[0]
    assert pref["chosen_tokens"].shape == pref["rejected_tokens"].shape
    assert pref["chosen_tokens"].shape[1] in D.DEFAULT_BUCKETS
