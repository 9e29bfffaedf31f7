"""Replies through the jitted sampler, the local judge, and the judge stage end to end offline."""
import dataclasses
import json

import numpy as np
import pytest

from hf_reference import tiny_hf_model
from pdpo_jax import data as pdata
from pdpo_jax.config import JudgeSection, ResponseSection
from pdpo_jax.eval import LocalJudge, generate_responses, run_judge_stage, select_histories
from pdpo_jax.eval import responses as responses_module
from pdpo_jax.models import from_pretrained


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gpt2_tok):
    """Two tiny random Llamas over the GPT-2 vocabulary, saved with their tokenizer."""
    out = {}
    for name, seed in (("sft", 0), ("dpo", 1)):
        folder = tmp_path_factory.mktemp(name)
        tiny_hf_model("llama", seed=seed, vocab_size=len(gpt2_tok)).save_pretrained(folder)
        gpt2_tok.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def histories():
    return pdata.read_turns(pdata.default_paths().dev)[:40]


RESP = ResponseSection(num_histories=3, max_new_tokens=5, batch_size=4, max_prompt_tokens=96,
                       seed=7)


def test_replies_are_seeded_and_batch_independent(checkpoints, gpt2_tok, histories):
    picked = select_histories(histories, 3, seed=0)
    assert picked == select_histories(histories, 3, seed=0) and len(picked) == 3
    model = from_pretrained(checkpoints["sft"])
    rows = generate_responses(model, gpt2_tok, "english", picked, RESP)
    assert [r["history_index"] for r in rows] == [0, 1, 2]
    assert all(r["sampling"]["seed"] == 7 and r["sampling"]["max_new_tokens"] == 5 for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    # Batch of 2 instead of 4 (and one prompt alone): the same replies, row by row.
    smaller = generate_responses(model, gpt2_tok, "english", picked,
                                 dataclasses.replace(RESP, batch_size=2))
    assert [r["response"] for r in smaller] == [r["response"] for r in rows]


def test_local_judge_runs_offline(checkpoints):
    judge = LocalJudge(checkpoints["dpo"], max_new_tokens=4, batch_size=2)
    prompts = ["Which reply is better? [[1]] or [[2]]?", "Pick one.", "Third prompt here."]
    answers = dict(judge.answers(prompts))
    assert sorted(answers) == [0, 1, 2] and all(isinstance(a, str) for a in answers.values())
    assert dict(judge.answers(prompts)) == answers          # greedy on the first attempt
    assert judge.judge_id.startswith("local:") and "max_new_tokens=4" in judge.judge_id


def test_judge_stage_with_local_judge_is_resumable(tmp_path, checkpoints, gpt2_tok, histories,
                                                   monkeypatch):
    cfg = JudgeSection(backend="local", local_checkpoint=str(checkpoints["sft"]), comparisons=4,
                       max_new_tokens=4, parse_retries=1, concurrency=4, bootstrap=20)
    markdown = run_judge_stage(tmp_path, checkpoints, gpt2_tok, histories, cfg, RESP)
    out = tmp_path / "judge"
    for label in checkpoints:
        rows = [json.loads(x) for x in (out / "responses" / f"{label}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and rows[0]["sampling"]["top_p"] == RESP.top_p
    comparisons = [json.loads(x) for x in (out / "comparisons.jsonl").read_text().splitlines()]
    assert len(comparisons) == 4
    # A random tiny judge writes no [[n]]: every comparison is invalid, none is a tie.
    assert all(c["verdict"] is None or c["answer"].count("[[") for c in comparisons)
    assert "| sft |" in markdown and "| sft vs dpo |" in markdown
    assert (out / "win_rates.png").is_file() and (out / "judgments.sqlite").is_file()

    # Rerun: replies and judgments are reused; nothing is sampled again.
    monkeypatch.setattr(responses_module, "sample_texts",
                        lambda *a, **k: pytest.fail("sampled again on a rerun"))
    assert run_judge_stage(tmp_path, checkpoints, gpt2_tok, histories, cfg, RESP) == markdown
    # Changing the sampling settings regenerates the replies.
    with pytest.raises(pytest.fail.Exception, match="sampled again"):
        run_judge_stage(tmp_path, checkpoints, gpt2_tok, histories, cfg,
                        dataclasses.replace(RESP, temperature=0.5))
    assert np.isfinite(json.loads((out / "summary.json").read_text())["models"]["sft"]["bt_theta"])
