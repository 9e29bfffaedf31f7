"""bench/bench_dpo.py --all end to end with its worker processes replaced by canned records:
the plan, the record parsing, the target ratios and the report (not a performance test)."""
import copy
import json
import os
import statistics
import subprocess
import sys

import pytest
from bench_modules import BENCH, bench_modules

MS = {"pdpo_jax": 300.0, "torch": 400.0, "trl": 800.0}


@pytest.fixture(scope="module")
def bench():
    """The bench modules as the scripts import them (tests/bench_modules.py)."""
    with bench_modules("common", "bench_dpo", "bench_sampler") as modules:
        yield modules


def _record(common, cmd: list[str]) -> dict:
    """What a worker prints for `cmd`: labels as the real workers build them, made-up times."""
    script = os.path.basename(cmd[0])
    if script == "matmul_peak.py":
        return {"bench": "matmul_peak", "machine_fp32": 2e11, "machine_bf16": 4e11,
                "jax_fp32": 2e11, "jax_bf16": 4e11}
    flags = cmd[1:]
    value = lambda name, default: flags[flags.index(name) + 1] if name in flags else default  # noqa: E731
    framework = {"bench_dpo.py": "pdpo_jax", "torch_dpo.py": "torch", "trl_dpo.py": "trl"}[script]
    precision, window = value("--precision", "fp32"), value("--window", "32")
    window = None if window == "none" else int(window)
    shared = "--share-prompt" in flags
    label = (f"{framework}-{precision}-" + ("full" if window is None else f"win{window}")
             + ("-shared" if shared else ""))
    if framework == "trl":
        label = "trl-fp32"
    ms = MS[framework] * (0.7 if shared else 1.0) * (0.8 if precision == "bf16" else 1.0)
    record = dict(bench="dpo", framework=framework, label=label, model=value("--model", "anchor"),
                  precision=precision, window=window, share_prompt=shared,
                  pairs=int(value("--pairs", 8)), seq_len=int(value("--seq-len", 128)),
                  load1_start=0.1, others_cpu_frac=0.0, cpu_steal_frac=0.0, compile_s=1.0)
    record = common.finish(record, [ms / 1e3] * 3, 0.5, {"machine_fp32": 2e11, "machine_bf16": 4e11})
    if framework == "trl":  # as from a system without /proc/self/clear_refs: no steps-only peak
        record.pop("steps_peak_rss_mib", None)
    return record


def test_all_writes_every_row_and_both_target_tables(bench, tmp_path, monkeypatch, capsys):
    bench_dpo = bench.bench_dpo

    def fake_run(args, **kw):
        record = _record(bench.common, args[1:])
        return subprocess.CompletedProcess(args, 0, json.dumps(record) + "\n", "")
    monkeypatch.setattr(bench_dpo.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_dpo.py", "--all", "--quick", "--results", str(tmp_path)])
    bench_dpo.main()
    (json_path,) = tmp_path.glob("dpo-*.json")
    out = json.loads(json_path.read_text())
    labels = [r["label"] for r in out["records"]]
    assert len(labels) == len(bench_dpo.ANCHOR_ROWS) and "error" not in json.dumps(out["records"])
    assert "pdpo_jax-bf16-win32-shared" in labels
    best = out["summary"]["targets"]["best vs fastest PyTorch row (hand-written or trl)"]
    assert best["ours"] == "pdpo_jax-bf16-win32-shared"
    assert best["ratio"] == pytest.approx(400 * 0.8 / (300 * 0.7 * 0.8), rel=1e-3)
    unshared = out["summary"]["targets_unshared"]
    assert all("shared" not in t.get("ours", "") for t in unshared.values())
    assert unshared["fp32 vs trl fp32"]["ratio"] == pytest.approx(800 / 300, rel=1e-3)
    table = next(tmp_path.glob("dpo-*.md")).read_text()
    assert "without dpo.share_prompt" in table and "pdpo_jax-fp32-win32-shared" in table
    assert "nan" not in table  # a value a worker could not measure prints as a dash


def test_rounds_report_each_rows_median_round(bench, tmp_path, monkeypatch):
    """--rounds 3: every anchor row runs in three processes, the second round in reverse order;
    a row reports its median round (here our bf16 shared row draws one slow round, which must
    not decide the ratio) and lists every round."""
    bench_dpo, calls = bench.bench_dpo, []
    slow = {"pdpo_jax-bf16-win32-shared": [1.1, 1.6, 1.0]}

    def fake_run(args, **kw):
        record = _record(bench.common, args[1:])
        if "label" in record:
            calls.append(record["label"])
            if record["label"] in slow:
                factor = slow[record["label"]][calls.count(record["label"]) - 1]
                record = bench.common.finish(record, [record["step_ms"] * factor / 1e3] * 3, 0.5,
                                             {"machine_fp32": 2e11, "machine_bf16": 4e11})
        return subprocess.CompletedProcess(args, 0, json.dumps(record) + "\n", "")
    monkeypatch.setattr(bench_dpo.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_dpo.py", "--all", "--quick", "--rounds", "3",
                                      "--results", str(tmp_path)])
    bench_dpo.main()
    rows = len(bench_dpo.ANCHOR_ROWS)
    assert len(calls) == 3 * rows
    assert calls[rows:2 * rows] == calls[:rows][::-1] and calls[2 * rows:] == calls[:rows]
    out = json.loads(next(tmp_path.glob("dpo-*.json")).read_text())
    assert len(out["records"]) == rows and len(out["round_records"]) == 3 * rows
    (ours,) = [r for r in out["records"] if r["label"] == "pdpo_jax-bf16-win32-shared"]
    base = 300 * 0.7 * 0.8
    assert ours["step_ms_rounds"] == pytest.approx([1.1 * base, 1.6 * base, base], rel=1e-3)
    assert ours["step_ms"] == pytest.approx(1.1 * base, rel=1e-3) and ours["round"] == 0
    best = out["summary"]["targets"]["best vs fastest PyTorch row (hand-written or trl)"]
    assert best["ratio"] == pytest.approx(400 * 0.8 / (1.1 * base), rel=1e-3)
    table = next(tmp_path.glob("dpo-*.md")).read_text()
    assert f"| {1.1 * base:.0f} / {1.6 * base:.0f} / {base:.0f} |" in table and "3 rounds" in table


def test_dpo_worker_times_the_projects_step():
    """The real pdpo_jax worker `--all` launches (the tests above replace it), two steps of the
    anchor model: it imports what the project exports now (a stale import broke it once,
    unseen) and its step trains (loss near log 2 at step 0, finite)."""
    cmd = [sys.executable, os.path.join(BENCH, "bench_dpo.py"), "jax", "--precision", "fp32",
           "--window", "32", "--share-prompt", "--warmup", "1", "--steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["label"] == "pdpo_jax-fp32-win32-shared" and record["step_ms"] > 0
    assert abs(record["final_loss"] - 0.693) < 0.05


def _sampler_record(bs, kind, dtype, call_ms, prefill_ms, tokens=((1, 2), (3, 4))):
    """A made-up bench_sampler worker record: per mode one median call of call_ms[mode]."""
    out = dict(framework=kind, dtype=dtype, prefill={"median_s": prefill_ms / 1e3},
               peak_rss_mib=500.0, others_cpu_frac=0.0, versions={kind: "x"},
               unroll_layers=False, attn_implementation="sdpa")
    for mode in bs.MODES:
        call = call_ms[mode] / 1e3
        out[mode] = dict(call={"median_s": call}, new_tokens_per_s=bs.BATCH * bs.NEW / call,
                         first_call_s=2.0, compile_s_approx=1.0,
                         decode_step_s=bs.decode_step_s(call, prefill_ms / 1e3))
    out["greedy"]["tokens"] = [list(row) for row in tokens]
    return out


def _sampler_table(bs, summary: dict) -> list[str]:
    """The markdown lines of a sampler run whose only model is the anchor, `summary`."""
    return bs.markdown(dict(stamp="s", allocator="tcmalloc", command="c", total_wall_s=1.0,
                            membw={"bandwidth_gbs": 50.0}, models={"anchor": summary},
                            noise=dict(max_load1=0.1, max_others_cpu_frac=0.0, contaminated=[],
                                       failed=[]))).splitlines()


def test_sampler_summary_and_table(bench):
    """bench_sampler's per-model summary (medians over rounds per precision, best-round speedup,
    bound, each framework at its faster precision) and its markdown rows, on two rounds of
    made-up worker records per precision."""
    bs = bench.bench_sampler

    def record(kind, dtype, call_ms, prefill_ms):
        tokens = ((1, 2), (3, 4)) if kind == "jax" or dtype == "float32" else ((1, 2), (3, 5))
        return _sampler_record(bs, kind, dtype, call_ms, prefill_ms, tokens)
    records = [record("jax", "float32", {"greedy": 160, "top_p": 200}, 65),
               record("hf", "float32", {"greedy": 320, "top_p": 560}, 80),
               record("jax", "bfloat16", {"greedy": 100, "top_p": 110}, 40),
               record("hf", "bfloat16", {"greedy": 260, "top_p": 520}, 60),
               record("jax", "float32", {"greedy": 220, "top_p": 340}, 85),
               record("hf", "float32", {"greedy": 340, "top_p": 580}, 76),
               record("jax", "bfloat16", {"greedy": 100, "top_p": 110}, 40),
               record("hf", "bfloat16", {"greedy": 250, "top_p": 500}, 60)]
    without = bs.summarise("anchor", "/tmp/x", 2, 7, copy.deepcopy(records), bandwidth=50.0)
    m = bs.summarise("anchor", "/tmp/x", 2, 7, records, bandwidth=50.0,
                     peaks={"float32": 2e11, "bfloat16": 4e11})
    fp32, bf16 = m["dtypes"]["float32"], m["dtypes"]["bfloat16"]
    assert fp32["greedy"]["jax_call_ms"] == 190.0 and fp32["greedy"]["hf_call_ms"] == 330.0
    assert fp32["greedy"]["speedup_best_round"] == pytest.approx(320 / 160, abs=0.01)
    tok_s = lambda *ms: sum(512 / (t / 1e3) for t in ms) / len(ms)  # median of two = mean  # noqa: E731
    assert fp32["greedy"]["speedup"] == pytest.approx(tok_s(160, 220) / tok_s(320, 340), abs=0.01)
    assert bf16["top_p"]["speedup"] == pytest.approx(tok_s(110) / tok_s(520, 500), abs=0.01)
    assert fp32["greedy_token_agreement_with_hf"] == 1.0
    assert bf16["greedy_token_agreement_with_hf"] == 0.75
    # bf16 reads half the bytes: the bound halves
    assert bf16["greedy"]["jax_bound_ms_per_step"] == pytest.approx(
        fp32["greedy"]["jax_bound_ms_per_step"] / 2, rel=1e-2)
    # roofline: the prefill at the peak, 31 steps at max(compute, memory); HF's call over it
    roof = bs.roofline("anchor", "float32", 2e11, 50.0)
    assert fp32["roofline"]["call_ms"] == pytest.approx(1e3 * roof["call_s"], abs=1e-3)
    assert roof["step_s"] == max(roof["step_compute_s"], roof["step_memory_s"])
    assert roof["call_s"] == pytest.approx(roof["prefill_s"] + 31 * roof["step_s"])
    assert fp32["greedy"]["ceiling_speedup"] == pytest.approx(0.330 / roof["call_s"], abs=0.01)
    assert fp32["jax_prefill_mfu"] == pytest.approx(roof["prefill_s"] / 0.075, abs=1e-3)  # median 65, 85
    assert fp32["top_p"]["hf_x_roofline"] == pytest.approx(
        fp32["top_p"]["hf_decode_ms_per_step"] / 1e3 / roof["step_s"], abs=0.01)
    assert bf16["roofline"]["prefill_ms"] == pytest.approx(fp32["roofline"]["prefill_ms"] / 2, abs=1e-3)
    without = without["dtypes"]["float32"]  # no GEMM peak: no roofline, the rest the same
    assert "roofline" not in without and "ceiling_speedup" not in without["greedy"]
    assert without["greedy"]["speedup"] == fp32["greedy"]["speedup"]
    best = m["best"]["greedy"]
    assert (best["jax_dtype"], best["hf_dtype"]) == ("bfloat16", "bfloat16")
    assert best["speedup"] == pytest.approx(tok_s(100) / tok_s(260, 250), abs=0.01)
    assert best["met"]  # 5120 / 2008.6 = 2.55 >= 2.5
    lines = _sampler_table(bs, m)
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | precision"))
    row = next(line for line in lines if line.startswith("| anchor | fp32 | greedy"))
    assert "2.00×" in row
    assert row.count("|") == lines[header].count("|") == lines[header + 1].count("|")
    assert any(line.startswith("| anchor | bf16 | top_p") for line in lines)
    best_row = next(line for line in lines if line.startswith("| anchor | greedy | 5120 (bf16)"))
    assert "**no**" not in best_row

def test_sampler_summary_of_the_issue_reference(bench):
    """The issue's minimal decode loop ("ref") timed in the same rounds: its median over rounds,
    its speedup over HF and ours over it, its greedy agreement with HF and with ours, and its
    table; the jax-vs-HF numbers are the same as without it."""
    bs = bench.bench_sampler
    ms = lambda g, p: {"greedy": g, "top_p": p}  # noqa: E731
    records = [_sampler_record(bs, "jax", "float32", ms(160, 200), 65),
               _sampler_record(bs, "hf", "float32", ms(320, 560), 80),
               _sampler_record(bs, "ref", "float32", ms(200, 280), 70, tokens=((1, 2), (3, 9))),
               _sampler_record(bs, "jax", "float32", ms(220, 340), 85),
               _sampler_record(bs, "hf", "float32", ms(340, 580), 76),
               _sampler_record(bs, "ref", "float32", ms(240, 300), 72)]
    without = bs.summarise("anchor", "/tmp/x", 2, 7, copy.deepcopy(
        [r for r in records if r["framework"] != "ref"]), bandwidth=50.0)["dtypes"]["float32"]
    m = bs.summarise("anchor", "/tmp/x", 2, 7, records, bandwidth=50.0)
    fp32 = m["dtypes"]["float32"]
    assert "reference" not in without
    assert {k: fp32[k] for k in bs.MODES} == {k: without[k] for k in bs.MODES}
    ref = fp32["reference"]
    tok_s = lambda *ms: sum(512 / (t / 1e3) for t in ms) / len(ms)  # median of two = mean  # noqa: E731
    assert ref["greedy"]["ref_new_tok_s"] == pytest.approx(tok_s(200, 240), abs=0.1)
    assert ref["greedy"]["ref_new_tok_s_per_round"] == [2560.0, pytest.approx(2133.3, abs=0.1)]
    assert ref["greedy"]["ref_speedup_over_hf"] == pytest.approx(tok_s(200, 240) / tok_s(320, 340), abs=0.01)
    assert ref["top_p"]["jax_speedup_over_ref"] == pytest.approx(tok_s(200, 340) / tok_s(280, 300), abs=0.01)
    assert ref["greedy"]["ref_decode_ms_per_step"] == pytest.approx(
        1e3 * statistics.median([bs.decode_step_s(0.2, 0.07), bs.decode_step_s(0.24, 0.072)]), abs=1e-3)
    assert ref["prefill_ms"] == 71.0
    # its first round's greedy tokens differ from both in one of four
    assert ref["greedy_token_agreement_with_hf"] == ref["greedy_token_agreement_with_jax"] == 0.75
    lines = _sampler_table(bs, m)
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | mode | reference"))
    row = lines[header + 2]
    assert row.startswith("| anchor | greedy | 2347 | ")
    assert row.count("|") == lines[header].count("|") == lines[header + 1].count("|")
    assert "75.0% / 75.0%" in row


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "..", "..", "shared", "anchors", "jax_reference.py")),
                    reason="../shared/anchors is not beside the repo")
def test_sampler_imports_the_issue_reference_beside_its_own_common(bench):
    """jax_reference.py imports the anchors' `common`; the bench's own `common` is back in
    sys.modules afterwards and the reference holds the anchors' one."""
    bs = bench.bench_sampler
    ref = bs._import_reference(bs.anchors_dir())
    try:
        assert sys.modules["common"] is bench.common
        assert ref.common is not bench.common and ref.common.GEN_BATCH == bs.BATCH
        assert (ref.common.PROMPT_LEN, ref.common.GEN_NEW, ref.common.TOP_P) == (bs.PROMPT, bs.NEW, bs.TOP_P)
    finally:
        sys.modules.pop("jax_reference", None)

def test_sampler_flop_counts_match_an_enumeration_of_the_matmuls(bench):
    """prefill_flops and decode_flops against the anchor Llama's matmuls written out one by one,
    as (rows, inputs, outputs) per sequence: 2 · rows · inputs · outputs FLOPs each."""
    bs, m = bench.bench_sampler, bench.common.MODELS["anchor"]
    B, P, D, F = bs.BATCH, bs.PROMPT, m["hidden_size"], m["intermediate_size"]
    L, N, K, H, V = (m["num_hidden_layers"], m["num_attention_heads"], m["num_key_value_heads"],
                     m["head_dim"], m["vocab_size"])

    def layer(tokens, query_positions, keys_of):
        """k, v of `tokens` tokens; q, o, MLP and per-head attention at `query_positions`."""
        q = len(query_positions)
        mms = [(tokens, D, K * H), (tokens, D, K * H), (q, D, N * H), (q, N * H, D),
               (q, D, F), (q, D, F), (q, F, D)]
        for t in query_positions:  # scores q·Kᵀ and probs·V, each head
            mms += [(1, H, keys_of(t)), (1, keys_of(t), H)] * N
        return mms

    prefill = [mm for _ in range(L - 1) for mm in layer(P, range(P), lambda t: t + 1)]
    prefill += layer(P, [P - 1], lambda t: t + 1) + [(1, D, V)]
    flops = lambda mms: B * sum(2 * r * i * o for r, i, o in mms)  # noqa: E731
    assert bs.prefill_flops("anchor") == flops(prefill)
    S = 112
    step = [mm for _ in range(L) for mm in layer(1, [0], lambda t: S)] + [(1, D, V)]
    assert bs.decode_flops("anchor", S) == flops(step)


def test_gpu_check_steps_run_on_tiny_shapes():
    """bench/gpu_check.py's peak, FLOP count and memory plan on the CPU with --smoke shapes, so a
    change that breaks the check is caught here rather than on a lent GPU (the DPO step it times
    is the trainer's, tested elsewhere; timing it inside the suite aborted a test worker). The
    FLOPs are re-derived from TINY's shapes: a 2-layer Llama with an untied head."""
    import argparse
    from pdpo_jax.models import config_from_hf
    with bench_modules("gpu_check") as modules:
        m, args = modules.gpu_check, argparse.Namespace(smoke=True)
        peak = m.step_peak(args)
        cfg = config_from_hf(m.TINY)
        v, d, f, layers, kv = 512, 64, 128, 2, 32  # 4 heads of 16, 2 kv heads
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
        params = 2 * v * d + layers * per_layer + d  # embedding, layers, final norm, head
        flops = m.dpo_step_flops(cfg, params, 8, 24, 8)
        tied = m.dpo_step_flops(cfg.replace(tie_embeddings=True), params - v * d, 8, 24, 8)
        memory = m.step_memory(args, {"xla": {"peak_bytes": 10**6}})
    trunk = layers * per_layer + d
    assert flops == 8 * 8 * (trunk * (24 + 2 * 8) + v * d * 2 * 8) == tied
    assert peak["bf16_tflops"] > 0 and peak["n"] == 256
    assert memory["predicted_bytes"] > 0 and memory["measured_peak_bytes"] == 10**6
    assert memory["ratio"] == 10**6 / memory["predicted_bytes"]


def test_packing_padding_counts_the_epochs_tokens(tmp_path):
    """bench/packing_padding.py on the tiny SFT config's records: each layout's padding share is
    1 - (the epoch's record tokens) / (its array cells), re-derived here from the encoded records
    and the shapes; one row per batch when a row holds the whole batch."""
    from pdpo_jax import data as pdata
    from pdpo_jax.config import load_config
    from pdpo_jax.context import make_context
    from pdpo_jax.train.stages import encode
    cfg = load_config("configs/tiny_sft.yaml", (f"run.out_dir={tmp_path}",
                                                "data.max_train_records=200"))
    with bench_modules("packing_padding") as modules:
        shares = modules.packing_padding.padding_shares(cfg, [256, 16 * 256])
    ctx = make_context(cfg)
    encoded, _ = encode(ctx, ctx.dialogues("train"), "records")
    plan = pdata.sft_batches(encoded, batch_size=16, pad_id=0, buckets=cfg.data.buckets,
                             seed=cfg.run.seed, process_index=0, process_count=1)
    used = [i for k in range(len(plan)) for i in plan[k]["index"] if i >= 0]
    real = sum(encoded[i].length for i in used)
    by = {(s["layout"], s["row_len"]): s for s in shares}
    buckets = by[("buckets", None)]
    longest = [max(encoded[i].length for i in plan[k]["index"] if i >= 0) for k in range(len(plan))]
    cells = sum(16 * min(b for b in cfg.data.buckets if b >= n) for n in longest)
    assert buckets["batches"] == len(plan) == len(encoded) // 16
    assert abs(buckets["padding_share"] - (1 - real / cells)) < 1e-12
    packed = by[("packed", 256)]
    assert abs(packed["padding_share"] - (1 - real / (len(plan) * packed["rows"] * 256))) < 1e-12
    assert by[("packed_own", 256)]["padding_share"] <= packed["padding_share"]
    whole = by[("packed_own", 16 * 256)]  # a row holds every batch: one row each
    assert abs(whole["padding_share"] - (1 - real / (len(plan) * 16 * 256))) < 1e-12


@pytest.mark.real_model
def test_engine_bench_workload_skips_records_a_chat_template_cannot_encode(tmp_path, smollm2_dir,
                                                                           monkeypatch):
    """bench_engine's SmolLM2 workload (chat template) skips the records without a partner turn,
    as the negatives stage does, instead of stopping the benchmark (it did, before its rows ran)."""
    monkeypatch.setenv("PDPO_SMOLLM2_DIR", str(smollm2_dir))
    with bench_modules("common", "bench_dpo", "bench_sampler", "bench_engine") as modules:
        out = modules.bench_engine.build_workloads("smollm2-135m", 40, 4, str(tmp_path / "w.json"))
        max_new = modules.bench_engine.MAX_NEW  # SmolLM2 stops at its own EOS: the whole budget
    assert out["prompts"] == 40 and out["dnli"] == 4
    workload = json.loads((tmp_path / "w.json").read_text())
    assert all(p["ids"] and p["budget"] == max_new for p in workload["prompts"])


def test_gpu_check_inference_steps_on_tiny_shapes():
    """bench/gpu_check.py's static-sampler and Dialogue-NLI steps with --smoke shapes on the CPU:
    the static sampler makes every budgeted token (random weights never stop early), our
    cached-prompt and full-row scores equal the HF KV-reusing peer's on the same weights, and
    the ratios are the rates' quotients."""
    import argparse
    with bench_modules("gpu_check") as modules:
        m, args = modules.gpu_check, argparse.Namespace(smoke=True)
        static = m.step_static(args)
        dnli = m.step_dnli(args)
        _, budgets = m._negatives_workload(args)
        ratios = m.step_ratios({"engine": {"slots_32": {"useful_tok_s": 300.0}},
                                "static": static, "dnli": dnli})
    assert static["batch_32"]["useful_tokens"] == sum(budgets)
    assert dnli["candidates"] == 4 * 33
    assert max(dnli[f"max_abs_diff_{k}"] for k in ("vs_hf", "full", "packed")) < 1e-4
    assert dnli["max_abs_score"] > 10  # sums of several nats: the comparison is not vacuous
    assert ratios["engine_vs_static_32"] == 300.0 / static["batch_32"]["useful_tok_s"]
    assert ratios["engine_vs_hf_32"] is None
    assert ratios["dnli_vs_full"] == dnli["cached"]["candidates_per_s"] / dnli["full"]["candidates_per_s"]
    assert ratios["dnli_cached_vs_packed"] == \
        dnli["cached"]["candidates_per_s"] / dnli["packed"]["candidates_per_s"]


def test_engine_bench_dnli_ratios_are_taken_where_the_peer_ran():
    """bench_engine's summary divides our cached layout's rate by each peer that ran
    (--dnli-kinds may leave some out) and reports the largest score difference to each."""
    def dnli(kind, rate, scores):
        return dict(bench="engine", workload="dnli", framework=kind, dtype="float32",
                    candidates_per_s=rate, scores=scores)
    records = [dnli("cached", 30.0, [-1.0, -2.5]), dnli("packed", 20.0, [-1.0, -2.4]),
               dnli("hf_kv", 24.0, [-1.25, -2.5])]
    with bench_modules("common", "bench_dpo", "bench_sampler", "bench_engine") as modules:
        out = modules.bench_engine.summarise(records)["dnli"]
    assert out["dnli_vs_hf_kv"] == 30.0 / 24.0 and out["cached_vs_packed"] == 30.0 / 20.0
    assert out["max_abs_diff_vs_hf_kv"] == 0.25
    assert out["max_abs_diff_vs_packed"] == pytest.approx(0.1)
    assert "dnli_vs_full" not in out


def test_gemm_shapes_counts_the_steps_matmuls_and_sets_steps_against_the_floor(tmp_path, monkeypatch):
    """bench/gemm_shapes.py: its GEMMs of a step hold 6 x (the block matrices' parameters of a
    SmolLM2-shaped pdpo_jax model) x tokens + 6 x D x V x head FLOPs, counted here from the
    model's own parameter shapes; the run (workers replaced by made-up rates) writes the floor,
    each SFT row's share of it and the ceiling ratio as re-derived here."""
    import numpy as np
    from flax import nnx

    from pdpo_jax.memory import build_model
    from pdpo_jax.models import ModelConfig
    with bench_modules("gemm_shapes") as modules:
        g = modules.gemm_shapes
        s = g.SMOLLM2
        cfg = ModelConfig(arch="llama", vocab_size=s["vocab"], d_model=s["d"], num_layers=s["layers"],
                          num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                          mlp_dim=s["mlp"], norm_eps=1e-5, max_positions=2048)
        model = nnx.eval_shape(lambda: build_model(cfg))
        blocks = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(model))
                     if path[0] == "layers" and len(v.shape) > 2)
        gemms = g.step_gemms(1536, 384)
        flops = sum(x["count"] * 2 * int(np.prod(x["shape"])) for x in gemms)
        assert flops == 6 * blocks * 1536 + 6 * s["d"] * s["vocab"] * 384

        rate = {"jax": {"bf16": 5e11, "fp32": 3e11}, "torch": {"bf16": 8e11, "fp32": 2e11}}

        def fake_run(cmd, **kw):
            fw = cmd[cmd.index("--worker") + 1]
            record = dict(fw=fw, rates={p: {x["name"]: r for x in gemms} for p, r in rate[fw].items()})
            return subprocess.CompletedProcess(cmd, 0, json.dumps(record) + "\n", "")
        monkeypatch.setattr(g.subprocess, "run", fake_run)
        train = tmp_path / "train.json"
        train.write_text(json.dumps({"records": [
            dict(task="sft", framework="pdpo_jax", precision="bf16", label="pdpo_jax-sft-bucketed-bf16", s_per_step=4.0),
            dict(task="sft", framework="torch", precision="bf16", label="torch-sft-bf16", s_per_step=3.0),
            dict(task="dpo", framework="torch", precision="bf16", label="torch-dpo-bf16", s_per_step=9.0)]}))
        monkeypatch.setattr(sys, "argv", ["gemm_shapes.py", "--rounds", "2", "--alloc", "glibc",
                                          "--train-results", str(train), "--results", str(tmp_path)])
        g.main()
    (path,) = tmp_path.glob("gemm-*.json")
    c = json.loads(path.read_text())["summary"]["comparison"]
    floor = {k: flops / rate[k.split("-")[0]][k.split("-")[1]] for k in ("jax-bf16", "torch-bf16")}
    assert c["floor_s"]["jax-bf16"] == pytest.approx(floor["jax-bf16"])
    assert c["train_rows"]["torch-sft-bf16"]["gemm_share"] == pytest.approx(floor["torch-bf16"] / 3.0)
    assert c["train_rows"]["pdpo_jax-sft-bucketed-bf16"]["gemm_share"] == pytest.approx(floor["jax-bf16"] / 4.0)
    assert "torch-dpo-bf16" not in c["train_rows"]
    assert c["ceiling_jax_bf16_over_torch_bf16"] == pytest.approx(3.0 / floor["jax-bf16"])
    assert "**" in next(tmp_path.glob("gemm-*.md")).read_text()
