"""Dialogue-NLI ranking: HF-logit parity of the scores, category accounting, the embedded file."""
import gzip
import json

import jax
import numpy as np
import pytest
import torch

from hf_reference import tiny_hf_model
from pdpo_jax import data as pdata
from pdpo_jax.config import EvalSection
from pdpo_jax.eval import dnli, dnli_scoring, run_dnli_stage
from pdpo_jax.eval.dnli import DnliResult, dnli_table, select_examples
from pdpo_jax.eval.dnli_scoring import score_dnli
from pdpo_jax.models import from_pretrained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tok):
    """A tiny random Llama over the GPT-2 vocabulary: (folder, HF torch model)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf = tiny_hf_model("llama", vocab_size=len(gpt2_tok))
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def embedded():
    return pdata.read_dnli_files(pdata.default_paths().dnli)


def _hf_candidate_logp(hf, tok, ex, text):
    """Σ log p(candidate + EOS | prompt) from HF logits; token ids made without encode_pair."""
    prompt = tok(pdata.render_prompt(pdata.get_template("english"), ex.persona, ex.history))["input_ids"]
    response = tok(" " + text)["input_ids"] + [tok.eos_token_id]
    ids = torch.as_tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=ids).logits.double(), -1)[0]
    targets = ids[0, len(prompt):]
    return float(logp[len(prompt) - 1:-1].gather(-1, targets[:, None]).sum()), len(response)


def _shortest(embedded):
    """The shortest prompt of each relation group: small buckets keep the tests fast."""
    return [min((e for e in embedded if e.group == g), key=lambda e: len(str(e.history)))
            for g in ("attributes", "havenot", "likedislike")]


@pytest.mark.parametrize("layout,batch_size", [("cached", 2), ("packed", 4), ("full", 16)])
def test_scores_match_hf_logits(tiny, gpt2_tok, embedded, layout, batch_size):
    folder, hf = tiny
    examples = _shortest(embedded)
    result = score_dnli(from_pretrained(folder), gpt2_tok, "english", examples,
                        batch_size=batch_size, progress=False, layout=layout)
    assert len(result.scores) == sum(len(e.candidates) for e in examples)
    by_id = {e.example_id: e for e in examples}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(result.scores), 8, replace=False):
        c = result.scores[i]
        expected, n = _hf_candidate_logp(hf, gpt2_tok, by_id[c.example_id], c.candidate)
        assert c.n_tokens == n
        np.testing.assert_allclose(c.score_sum, expected, rtol=1e-5, atol=1e-4)
        assert c.score("mean") == pytest.approx(c.score_sum / n)


@pytest.mark.parametrize("layout", ["cached", "packed"])
def test_shared_prompt_layouts_equal_full_rows(tiny, gpt2_tok, embedded, layout):
    """Every candidate of 3 examples: a cached prompt with its candidates in short rows (several
    rows per example), and packed rows (one prompt, many candidates, 2 rows per example where
    they do not fit one), score what one row per candidate scores, up to fp32 summation order."""
    examples = _shortest(embedded)
    model = from_pretrained(tiny[0])
    full = score_dnli(model, gpt2_tok, "english", examples, batch_size=16, progress=False,
                      layout="full")
    shared = score_dnli(model, gpt2_tok, "english", examples, batch_size=2, progress=False,
                        layout=layout)
    assert [(c.example_id, c.candidate_index, c.n_tokens) for c in shared.scores] == \
        [(c.example_id, c.candidate_index, c.n_tokens) for c in full.scores]
    np.testing.assert_allclose([c.score_sum for c in shared.scores],
                               [c.score_sum for c in full.scores], rtol=2e-6, atol=2e-5)
    assert shared.rank1("sum") == full.rank1("sum")


def test_packed_rows_split_when_candidates_do_not_fit(monkeypatch, tiny, gpt2_tok, embedded):
    """A row budget that holds a third of the candidates: every candidate is still scored once,
    and the scores do not change."""
    examples = _shortest(embedded)[:1]
    model = from_pretrained(tiny[0])
    whole = score_dnli(model, gpt2_tok, "english", examples, batch_size=2, progress=False)
    prompt_len = len(gpt2_tok.encode(whole.prompts[examples[0].example_id]))
    monkeypatch.setattr(dnli_scoring, "MAX_ROW", prompt_len + 100)
    monkeypatch.setattr(dnli_scoring, "ROW_BUCKETS", (prompt_len + 100, 4096))
    split = score_dnli(model, gpt2_tok, "english", examples, batch_size=2, progress=False)
    np.testing.assert_allclose([c.score_sum for c in split.scores],
                               [c.score_sum for c in whole.scores], rtol=2e-6, atol=2e-5)


def test_scoring_multiplies_in_fp32_whatever_the_default(monkeypatch, tiny, gpt2_tok, embedded):
    """On a GPU the default fp32 matmul is TF32 and on a TPU one bf16 pass; scoring traces its
    programs under 'highest' even when the caller's default is lower (the CPU computes fp32
    either way, so the test reads the precision the scoring calls are traced under)."""
    seen = []
    real = dnli_scoring._score_packed

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return real(*args, **kwargs)

    monkeypatch.setattr(dnli_scoring, "_score_cached", spy)
    with jax.default_matmul_precision("bfloat16"):
        score_dnli(from_pretrained(tiny[0]), gpt2_tok, "english", _shortest(embedded)[:1],
                   batch_size=2, progress=False)
        assert jax.config.jax_default_matmul_precision == "bfloat16"  # restored afterwards
    assert seen and set(seen) == {"highest"}


def _write_dnli(path, examples):
    with gzip.open(path, "wt") as f:
        for persona, prefix, cands in examples:
            f.write(json.dumps({"persona": persona, "prefix": prefix, "eval_labels": cands["label"],
                                "triple": [], "candidates": cands}) + "\n")


# Shortest candidate wins under the fake scorer below; built so each example has a known winner.
HAND_MADE = [
    (["i like cats ."], ["hi !"], {"label": ["ok ."], "similar": ["i do like cats a lot ."],
                                   "rand": ["the weather is nice today ."],
                                   "neg": ["i hate cats so much ."]}),
    (["i am tall ."], ["hello"], {"label": ["hello there , how are you ?"],
                                  "similar": ["tall ."],
                                  "rand": ["what is your favourite food ?"],
                                  "neg": ["i am very short for my age ."]}),
    (["i drive a car ."], ["hey", "hi"], {"label": ["yes i drive every single day ."],
                                          "similar": ["i really love my little car ."],
                                          "rand": ["my dog is called rex ."],
                                          "neg": ["no ."]}),
]


def _fake_token_logps(graphdef, params, batch, *, chunk):
    """Every token of an n-token candidate scores -n, so Σ = -n² and the mean is -n: the
    candidate with the fewest tokens wins both ways."""
    segments, target = np.asarray(batch["segments"]), np.asarray(batch["target"])
    seg_BQ = np.take_along_axis(segments, target, axis=1)
    n_BQ = np.stack([np.bincount(row, minlength=row.max() + 1)[row] for row in seg_BQ])
    return np.where(np.asarray(batch["valid"]), -n_BQ, 0).astype(np.float32)


@pytest.mark.parametrize("layout,scorer,row_budget", [("cached", "_score_cached", "CONTINUATION_ROW"),
                                                      ("packed", "_score_packed", "MAX_ROW")])
def test_category_accounting_on_hand_made_file(tmp_path, gpt2_tok, tiny, monkeypatch, layout,
                                               scorer, row_budget):
    path = tmp_path / "valid_havenot.jsonl.gz"
    _write_dnli(path, HAND_MADE)
    examples = pdata.read_dnli(path)
    monkeypatch.setattr(dnli_scoring, scorer, _fake_token_logps)
    # a few candidates per row: several rows per example
    monkeypatch.setattr(dnli_scoring, row_budget, 16 if layout == "cached" else 40)
    result = score_dnli(from_pretrained(tiny[0]), gpt2_tok, "english", examples, batch_size=3,
                        progress=False, layout=layout)
    for norm in ("sum", "mean"):
        winners = result.winners(norm)
        assert [winners[e.example_id].category for e in examples] == ["hits", "entail", "contradict"]
        shares = result.rank1(norm)
        assert shares["all"] == pytest.approx({"hits": 100 / 3, "entail": 100 / 3, "random": 0.0,
                                               "contradict": 100 / 3, "n": 3})
        assert list(shares) == ["all", "havenot"]
    # Scores come back in file order with their token counts.
    first = [c for c in result.scores if c.example_id == examples[0].example_id]
    assert [c.candidate for c in first] == [t for t, _ in examples[0].candidates]
    assert all(c.score_sum == -c.n_tokens ** 2 for c in result.scores)
    # A tie goes to the earlier candidate.
    tied = DnliResult([dnli.CandidateScore("x", "havenot", 0, "random", "a", -1.0, 1),
                       dnli.CandidateScore("x", "havenot", 1, "hits", "b", -1.0, 1)], {"x": "p"})
    assert tied.winners()["x"].category == "random"
    table = dnli_table({"model": result}, "sum", by_group=True)
    assert "| model | havenot | 33.3 | 33.3 | 0.0 | 33.3 | 3 |" in table


def test_select_examples_keeps_every_group(embedded):
    chosen = select_examples(embedded, 7)
    assert len(chosen) == 7
    assert {e.group for e in chosen} == {"attributes", "havenot", "likedislike"}
    assert select_examples(embedded, None) == embedded


def test_embedded_file_end_to_end(tmp_path, tiny, gpt2_tok, embedded, monkeypatch):
    assert len(embedded) == 542
    cfg = EvalSection(max_examples=6, batch_size=4, max_prompt_tokens=96)
    checkpoints = {"sft": tiny[0], "dpo": tiny[0]}
    markdown = run_dnli_stage(tmp_path, checkpoints, gpt2_tok, cfg, "english")
    for needle in ("| Checkpoint | Hits↑ | Entail↑ | Rand↓ | Contradict↓ | n |", "| sft |",
                   "| dpo |", "| sft | attributes |", "| dpo | likedislike |", "length-normalised"):
        assert needle in markdown
    rows = [json.loads(line) for line in (tmp_path / "dnli" / "sft.jsonl").read_text().splitlines()]
    assert {r["category"] for r in rows} == {"hits", "entail", "random", "contradict"}
    assert len({r["example_id"] for r in rows}) == 6                # none skipped
    assert set(rows[0]) >= {"example_id", "group", "prompt", "candidate", "category", "score_sum",
                            "n_tokens"}
    assert rows[0]["prompt"].startswith("Your persona:")
    for norm in ("sum", "mean"):
        assert (tmp_path / "dnli" / f"dnli_{norm}.png").stat().st_size > 1000
    # the same checkpoint twice: every paired difference and its interval are exactly 0
    assert "| Δ dpo − sft (95% CI) | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in markdown
    assert "**Smoke signal:** fewer than 100 examples in all (6)" in markdown
    summary = json.loads((tmp_path / "dnli" / "summary.json").read_text())
    diffs = summary["scores"]["sum"]["differences"]["dpo"]
    assert diffs["all"]["n"] == 6 and set(diffs) == {"all", "attributes", "havenot", "likedislike"}
    assert all(diffs[g][c] == {"diff": 0.0, "low": 0.0, "high": 0.0} for g in diffs
               for c in ("hits", "entail", "random", "contradict"))
    # Same checkpoint under two labels: identical scores.
    dpo = (tmp_path / "dnli" / "dpo.jsonl").read_text()
    assert [json.loads(x)["score_sum"] for x in dpo.splitlines()] == [r["score_sum"] for r in rows]

    # A rerun reuses the stored scores instead of scoring again.
    monkeypatch.setattr("pdpo_jax.eval.stages.score_dnli",
                        lambda *a, **k: pytest.fail("rescored a finished checkpoint"))
    assert run_dnli_stage(tmp_path, checkpoints, gpt2_tok, cfg, "english") == markdown


def test_eval_stage_scores_in_the_configured_layout(tmp_path, tiny, gpt2_tok, monkeypatch):
    """`eval.dnli_layout` reaches the scorer (default: the cached prompt); an unknown one is a
    config error naming the key."""
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs["layout"])
        raise Stop
    monkeypatch.setattr("pdpo_jax.eval.stages.score_dnli", spy)
    for cfg in (EvalSection(max_examples=3), EvalSection(max_examples=3, dnli_layout="full")):
        with pytest.raises(Stop):
            run_dnli_stage(tmp_path, {"sft": tiny[0]}, gpt2_tok, cfg, "english")
    assert seen == ["cached", "full"]
    from pdpo_jax.config import load_config
    from pdpo_jax.errors import UserError
    with pytest.raises(UserError, match="eval.dnli_layout"):
        load_config("configs/tiny_eval.yaml", ("eval.dnli_layout=rows",))


def test_sharded_scores_equal_unsharded(tiny, gpt2_tok, embedded):
    from pdpo_jax.sharding import make_mesh
    examples = select_examples(embedded, 1)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    plain = score_dnli(from_pretrained(tiny[0]), gpt2_tok, "english", examples, batch_size=4,
                       max_prompt_tokens=96, progress=False)
    sharded = score_dnli(from_pretrained(tiny[0], mesh=mesh), gpt2_tok, "english", examples,
                         batch_size=4, max_prompt_tokens=96, mesh=mesh, progress=False)
    assert len(sharded.scores) == len(examples[0].candidates) and not sharded.skipped
    np.testing.assert_allclose([c.score_sum for c in sharded.scores],
                               [c.score_sum for c in plain.scores], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="none of the 1 DNLI examples fits max_prompt_tokens=40"):
        score_dnli(from_pretrained(tiny[0]), gpt2_tok, "english", examples, max_prompt_tokens=40,
                   progress=False)
    odd = score_dnli(from_pretrained(tiny[0], mesh=mesh), gpt2_tok, "english", examples,
                     batch_size=3, max_prompt_tokens=96, mesh=mesh, progress=False)  # rounds to 4
    np.testing.assert_allclose([c.score_sum for c in odd.scores],
                               [c.score_sum for c in plain.scores], rtol=1e-5, atol=1e-4)


def test_command_line_on_any_checkpoint(tmp_path, tiny, gpt2_tok, capsys):
    from pdpo_jax.eval.__main__ import main
    gpt2_tok.save_pretrained(tmp_path / "tok")
    args = ["dnli", "--checkpoint", f"mine={tiny[0]}", "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "out"), "max_examples=3", "eval.max_prompt_tokens=96",
            "normalise=sum"]
    assert main(args) == 0
    markdown = capsys.readouterr().out
    assert "| mine |" in markdown and "length-normalised" not in markdown
    assert (tmp_path / "out" / "dnli" / "mine.jsonl").is_file()
    # a user's mistake: one line naming the key and the fix, status 2, no traceback
    assert main([*args[:7], "max_example=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'max_examples'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
