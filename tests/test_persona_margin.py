"""The persona-margin filter of pseudo-negatives, and the negatives stage's subsets, drop mode
and data_stats.json, on a random tiny model."""
import json

import numpy as np
import pytest

from pdpo_jax import data as pdata
from pdpo_jax import pipeline
from pdpo_jax.config import load_config
from pdpo_jax.context import make_context
from pdpo_jax.models import from_pretrained
from pdpo_jax.run_report import _data_stats, _margins
from pdpo_jax.sampling import SamplingConfig
from pdpo_jax.sampling import negatives as neg


def _full_forward_logps(model, rows: list[pdata.Encoded]) -> np.ndarray:
    """Σ log p(response | prompt) per row from one plain forward over the whole rows (logits
    at every position, log-softmax in float64): none of the scorer's column selection,
    chunking or bucketing."""
    T = max(e.length for e in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    for i, e in enumerate(rows):
        tokens[i, :e.length] = e.tokens
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    logits, _ = model(tokens, positions, tokens >= 0)  # causal: right padding changes nothing
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.array([sum(logp[i, t - 1, e.tokens[t]] for t in range(len(e.prompt_ids), e.length))
                     for i, e in enumerate(rows)])


def test_filter_keeps_exactly_the_pairs_whose_margin_exceeds_it(tiny_sft_model, demo_tokenizer):
    """Rows as the sampler leaves them (a reply under a swapped persona: here another record's
    reference reply), scored by the builder's filter and by a plain full forward: the filter keeps
    exactly the rows whose independently computed margin exceeds the threshold."""
    dev = pdata.read_turns(pdata.default_paths().dev)
    records = dev[:40:2]
    personas = neg.swapped_personas(records, seed=0, pool=dev)
    rows = [{"persona": list(r.persona), "swapped_persona": list(p), "history": list(r.history),
             "rejected": dev[200 + i].response} for i, (r, p) in enumerate(zip(records, personas))]
    model = from_pretrained(tiny_sft_model)
    sides = [pdata.encode_pair(demo_tokenizer, "english", p, row["history"], row["rejected"],
                               max_prompt_tokens=200)
             for row in rows for p in (row["swapped_persona"], row["persona"])]
    logps = _full_forward_logps(model, sides).reshape(len(rows), 2)
    diffs = logps[:, 0] - logps[:, 1]
    margin = float(np.median(diffs))  # half the rows above it
    assert min(abs(d - margin) for d in diffs) > 2e-4  # no row within the tolerance of it
    sampling = SamplingConfig(max_new_tokens=6, eos_ids=(0,), seed=0, pad_id=0)
    builder = neg.NegativeBuilder(model, demo_tokenizer, "english",
                                  sampling, max_prompt_tokens=200, batch_size=8, shard_size=12,
                                  keep_truncated=True, generator="tiny", filter_margin=margin,
                                  buckets=(64, 128, 256))
    kept_all = [dict(r) for r in rows]
    builder._filter_by_margin(rows)  # 40 scored rows (20 pairs) in calls of 8
    builder._filter_by_margin(kept_all, drop=False)  # a dev split without negatives.filter_dev
    assert [r["persona_margin"] for r in kept_all] == [r["persona_margin"] for r in rows]
    assert not any("filtered" in r for r in kept_all)
    for row, diff in zip(rows, diffs):
        # two ~100-nat fp32 sums (ulp 7.6e-6 at 100) differ by a few ulps from the float64 ones
        assert row["persona_margin"] == pytest.approx(diff, abs=1e-4)
        assert row.get("filtered") == (None if diff > margin else "persona_margin")
    assert sum("filtered" in r for r in rows) == 10


def test_negatives_stage_disjoint_drop_and_margin_filter(tmp_path, tiny_sft_model):
    run = tmp_path / "run"
    cfg = load_config("configs/tiny_dpo.yaml", (
        f"run.out_dir={run}", "run.stages=[negatives]", f"model.checkpoint={tiny_sft_model}",
        "data.max_train_records=40", "data.max_dev_records=12", "negatives.records=disjoint",
        "negatives.max_records=16", "data.truncation=drop", "data.max_total_tokens=128",
        "data.max_response_tokens=8", "data.buckets=[64,128]", "negatives.keep_truncated=true",
        "negatives.filter=persona_margin", "negatives.filter_margin=0",
        "negatives.batch_size=16"))
    pipeline.run(cfg)
    out = run / "negatives"
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["truncation"] == "drop" and stats["max_prompt_tokens"] == 120
    for split, n in (("train", 16), ("dev", 12)):
        s = stats[split]
        assert s["total"] == n and s["truncated"] == 0 and s["history_turns_dropped"] == 0
        summary = json.loads((out / f"{split}_summary.json").read_text())
        assert summary["prompts"] == s
        margin = summary["persona_margin"]
        assert margin["scored"] + margin["unscored"] == s["kept"] - sum(
            v for k, v in summary["filtered"].items()
            if not k.startswith(("persona_margin", "prompt_")))
        assert margin["q10"] <= margin["median"] <= margin["q90"]
        below = margin["scored"] - margin["above_threshold"]
        if split == "train":  # filtered
            assert margin["applied"] and summary["pairs"] == margin["above_threshold"]
            assert summary["filtered"].get("persona_margin", 0) == below
        else:  # scored, none dropped (negatives.filter_dev: false): the unfiltered run's dev set
            assert not margin["applied"] and below > 0
            assert summary["pairs"] == margin["scored"] + margin["unscored"]
            assert not any(k.startswith("persona_margin") for k in summary["filtered"])
    assert stats["train"]["dropped"].get("history_too_long", 0) > 0  # drop mode dropped some
    sft_ids = {r.record_id for r in make_context(cfg).dialogues("train")}
    pairs = pdata.read_preference_jsonl(out / "train_pairs.jsonl")
    assert pairs and not {p.pair_id for p in pairs} & sft_ids
    assert all(p.metadata["persona_margin"] > 0 for p in pairs)
    dev = pdata.read_preference_jsonl(out / "dev_pairs.jsonl")
    assert min(p.metadata["persona_margin"] for p in dev
               if p.metadata["persona_margin"] is not None) <= 0  # kept though below it
    report = "\n".join(_data_stats(run) + _margins(run))
    assert "| negatives | train | 16 |" in report and "| negatives | dev | 12 |" in report
    assert "Persona margin" in report and "| > 0 |" in report
    assert "| all (filter_dev: false) |" in report
