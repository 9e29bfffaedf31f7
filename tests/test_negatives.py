"""The pseudo-preference builder: persona swapping, modes, resume, filters and bad input."""
import json

import pytest
import transformers

from pdpo_jax import data as pdata
from pdpo_jax import pipeline
from pdpo_jax.config import load_config
from pdpo_jax.models import ModelConfig, build_model, save_pretrained
from pdpo_jax.sampling import SamplingConfig
from pdpo_jax.sampling import negatives as neg

TOKENIZER = "data/tokenizer_demo"


def _records(n=40):
    return pdata.read_turns(pdata.default_paths().dev)[:n]


def test_shuffle_never_keeps_own_persona_or_dialogue():
    records = _records(300)
    swapped = neg.swapped_personas(records, seed=0)
    assert all(tuple(r.persona) != p for r, p in zip(records, swapped))
    owners = {}
    for r in records:
        owners.setdefault(tuple(r.persona), set()).add(r.dialogue_id)
    assert all(r.dialogue_id not in owners[p] for r, p in zip(records, swapped))
    assert swapped == neg.swapped_personas(records, seed=0)  # seeded
    assert swapped != neg.swapped_personas(records, seed=1)
    assert len(set(swapped)) > 5  # actually mixes personas


def test_shuffle_needs_two_personas():
    all_records = _records(200)
    records = [r for r in all_records if r.dialogue_id == all_records[0].dialogue_id]
    records = [pdata.PersonaTurn(r.dialogue_id, records[0].persona, r.history, r.response) for r in records]
    with pytest.raises(ValueError, match="at least 2 distinct personas"):
        neg.swapped_personas(records, seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_sft_model):
    return tiny_sft_model


def _builder(model_dir, shard_size=16, max_new=8):
    from pdpo_jax.models import from_pretrained
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    sampling = SamplingConfig(max_new_tokens=max_new, eos_ids=(0,), seed=0, pad_id=0)
    return neg.NegativeBuilder(from_pretrained(model_dir), tok, "english", sampling,
                               max_prompt_tokens=200, batch_size=8, shard_size=shard_size,
                               keep_truncated=True, generator=str(model_dir))


def _lines(path):
    return path.read_text().splitlines()


def test_no_shuffle_uses_own_persona_and_resume_is_identical(tiny_model, tmp_path, monkeypatch):
    records = _records(40)
    personas = [tuple(r.persona) for r in records]
    whole = tmp_path / "whole"
    whole.mkdir()
    summary = _builder(tiny_model).run(neg.NegativeJob("train", records, personas, whole))
    pairs = [json.loads(l) for l in _lines(whole / "train_pairs.jsonl")]
    assert all(p["swapped_persona"] == p["persona"] for p in pairs)
    assert summary["pairs"] == len(pairs) and summary["records"] == 40
    assert sum(summary["filtered"].values()) + summary["pairs"] == 40

    killed = tmp_path / "killed"
    killed.mkdir()
    real = neg.write_jsonl_atomic
    calls = {"n": 0}

    def dying(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after one of three shards was written
        real(path, rows)

    monkeypatch.setattr(neg, "write_jsonl_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        _builder(tiny_model).run(neg.NegativeJob("train", records, personas, killed))
    assert len(list((killed / "train_shards").glob("*.jsonl"))) == 1
    assert not list((killed / "train_shards").glob("*.tmp"))
    monkeypatch.setattr(neg, "write_jsonl_atomic", real)
    _builder(tiny_model).run(neg.NegativeJob("train", records, personas, killed))
    assert _lines(killed / "train_pairs.jsonl") == _lines(whole / "train_pairs.jsonl")


def test_filters_are_counted(tiny_model, tmp_path):
    records = _records(16)
    builder = _builder(tiny_model, max_new=2)
    builder.keep_truncated = False
    summary = builder.run(neg.NegativeJob("dev", records, [tuple(r.persona) for r in records], tmp_path))
    assert summary["filtered"].get("truncated", 0) > 0
    assert summary["pairs"] + sum(summary["filtered"].values()) == 16


def _cfg(tmp_path, *extra):
    return load_config("configs/tiny_dpo.yaml", (f"run.out_dir={tmp_path}", "data.max_train_records=16",
                                                 "data.max_dev_records=8", *extra))


def test_stage_errors(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="samples from an SFT model: add `sft` to run.stages"):
        pipeline.run(_cfg(tmp_path / "a"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no dialogues"):
        pipeline.run(_cfg(tmp_path / "e", f"model.checkpoint={tiny_model}", f"data.train={empty}",
                          f"data.dev={empty}"))
    with pytest.raises(ValueError, match="train_pairs.jsonl: missing"):
        pipeline.run(_cfg(tmp_path / "b", "negatives.mode=external", f"negatives.external={tmp_path}"))
    with pytest.raises(ValueError, match="tokenizer has 4096 tokens but the model's vocab is 1000"):
        small = tmp_path / "c" / "sft" / "best"
        cfg = ModelConfig(arch="llama", vocab_size=1000, d_model=16, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=8, mlp_dim=32, norm_eps=1e-5, max_positions=64)
        save_pretrained(build_model(cfg), small)
        pipeline.run(_cfg(tmp_path / "c"))


def test_external_mode_copies_validated_pairs(tmp_path):
    src = tmp_path / "other"
    src.mkdir()
    pair = pdata.PreferencePair(("i like tea.",), ("hi",), "i love tea!", "i hate it.", "x/0")
    for name in ("train_pairs.jsonl", "dev_pairs.jsonl"):
        pdata.write_preference_jsonl(src / name, [pair])
    ctx_dir = tmp_path / "run"
    cfg = _cfg(ctx_dir, "negatives.mode=external", f"negatives.external={src}", "run.stages=[negatives]")
    pipeline.run(cfg)
    assert pdata.read_preference_jsonl(ctx_dir / "negatives" / "train_pairs.jsonl") == [pair]
