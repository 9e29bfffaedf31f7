"""Record subsets are drawn (seeded, spread over the file), negatives.records=disjoint really is
disjoint and `same` is SFT's records, the swap pool is the whole split, and
data.truncation=drop drops exactly the records truncation would cut."""
import pathlib

import numpy as np
import pytest

from pdpo_jax import data as pdata
from pdpo_jax.config import load_config
from pdpo_jax.context import RunContext
from pdpo_jax.errors import UserError
from pdpo_jax.sampling.negatives import swapped_personas


@pytest.fixture(scope="module")
def train_records():
    return pdata.read_turns(pdata.default_paths().train)


def _ctx(tmp_path, *overrides) -> RunContext:
    cfg = load_config("configs/tiny_sft.yaml", (f"run.out_dir={tmp_path}", *overrides))
    return RunContext(cfg, pathlib.Path(tmp_path), mesh=None, tokenizer=None)


def test_subset_is_seeded_sorted_and_spread_over_conversations(train_records):
    n = len(train_records)
    picked = pdata.sample_indices(n, 500, seed=0, stream="train")
    assert len(set(picked.tolist())) == 500 and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, pdata.sample_indices(n, 500, seed=0, stream="train"))
    assert not np.array_equal(picked, pdata.sample_indices(n, 500, seed=1, stream="train"))
    assert not np.array_equal(picked, pdata.sample_indices(n, 500, seed=0, stream="dev"))
    conversations = {train_records[i].dialogue_id for i in picked}
    first = {r.dialogue_id for r in train_records[:500]}
    assert len(conversations) > 10 * len(first)          # 18 conversations in the first 500
    assert picked[0] < 0.02 * n and picked[-1] > 0.98 * n  # from the whole file
    np.testing.assert_array_equal(pdata.sample_indices(n, None, 0, "train"), np.arange(n))
    np.testing.assert_array_equal(pdata.sample_indices(n, n + 5, 0, "train"), np.arange(n))


def test_negatives_records_same_and_disjoint(tmp_path, train_records):
    same = _ctx(tmp_path, "data.max_train_records=300")
    sft = same.dialogues("train")
    assert sft == [train_records[i] for i in same.subset_indices("train")]
    assert same.negative_records() == sft  # `same`: what SFT trained on (as before)
    assert len(_ctx(tmp_path, "data.max_train_records=300", "negatives.max_records=50")
               .negative_records()) == 50

    disjoint = _ctx(tmp_path, "data.max_train_records=300", "negatives.records=disjoint",
                    "negatives.max_records=200")
    negatives = disjoint.negative_records()
    assert disjoint.dialogues("train") == sft  # the SFT draw does not move
    ids = {r.record_id for r in negatives}
    assert len(ids) == 200 and not ids & {r.record_id for r in sft}
    every = _ctx(tmp_path, "data.max_train_records=300", "negatives.records=disjoint")
    assert len(every.negative_records()) == len(train_records) - 300
    with pytest.raises(UserError, match="negatives.records=disjoint: SFT uses all"):
        _ctx(tmp_path, "data.max_train_records=null",
             "negatives.records=disjoint").negative_records()


def test_swap_pool_is_the_whole_split(train_records):
    records = train_records[:40]  # two conversations: four personas of their own
    swapped = swapped_personas(records, seed=0, pool=train_records)
    own = {tuple(r.persona) for r in records}
    owners = {}
    for r in train_records:
        owners.setdefault(tuple(r.persona), set()).add(r.dialogue_id)
    assert all(r.dialogue_id not in owners[p] for r, p in zip(records, swapped))
    assert len(set(swapped) - own) > 30  # drawn from the split, not the four
    assert swapped == swapped_personas(records, seed=0, pool=train_records)


def test_drop_mode_drops_exactly_the_records_truncation_cuts(demo_tokenizer, train_records):
    records = train_records[:300]
    budget = dict(max_total_tokens=128, max_response_tokens=48)
    cut, cut_stats = pdata.encode_records(demo_tokenizer, "english", records, **budget)
    kept, drop_stats = pdata.encode_records(demo_tokenizer, "english", records, **budget,
                                            truncate=False)
    assert cut_stats.truncated > 0 and drop_stats.truncated == 0
    assert drop_stats.dropped["history_too_long"] == cut_stats.truncated
    assert [e.source_index for e in kept] == [e.source_index for e in cut if not e.history_dropped]
    assert drop_stats.total == cut_stats.total == 300
    assert drop_stats.kept + sum(drop_stats.dropped.values()) == 300
