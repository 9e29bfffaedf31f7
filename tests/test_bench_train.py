"""bench/bench_train.py end to end with its workload and worker processes replaced by canned
ones: the plan, the rounds, the record parsing, the targets and the report (not a performance
test); and the FLOP and layout counts of bench/train_workload.py against hand-made batches."""
import importlib
import json
import os
import sys
import types

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
# useful tok/s each canned worker reports, by (framework, task, layout/precision)
RATE = {"pdpo_jax": 300.0, "torch": 200.0, "trl": 150.0}


@pytest.fixture(scope="module")
def bench():
    """The bench modules as the scripts import them (see test_bench_harness.bench)."""
    env, path, modules = dict(os.environ), list(sys.path), set(sys.modules)
    sys.path.insert(0, BENCH)
    try:
        yield types.SimpleNamespace(**{m: importlib.import_module(m) for m in
                                       ("common", "bench_dpo", "train_workload", "bench_train")})
    finally:
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            del sys.modules[name]


WORKLOAD = {
    "settings": dict(config="configs/smollm2_135m_shuffle.yaml", template="chat", max_total_tokens=192,
                     max_response_tokens=48, buckets=[128, 192], sft_batch=2, dpo_batch=2,
                     sft_pack_length=192, dpo_pack_length=384, beta=0.5, share_prompt=True),
    "pad_id": 2,
    "sft": [dict(p=[5] * 10, r=[6] * 3), dict(p=[5] * 7, r=[6] * 5)],
    "dpo": [dict(p=[5] * 10, c=[6] * 3, r=[7] * 4), dict(p=[5] * 7, c=[6] * 5, r=[7] * 2)],
    "sft_plan": [[0, 1]], "dpo_plan": [[1, 0]],
}


def _record(bench, cmd: list[str], slow: float = 1.0) -> dict:
    script = os.path.basename(cmd[0])
    if script == "matmul_peak.py":
        return {"bench": "matmul_peak", "machine_fp32": 2e11, "machine_bf16": 4e11}
    value = lambda name, default=None: cmd[cmd.index(name) + 1] if name in cmd else default  # noqa: E731
    framework = value("--framework", "pdpo_jax") if script == "torch_train.py" else "pdpo_jax"
    task, precision, layout = value("--task"), value("--precision"), value("--layout", "dynamic")
    rate = RATE[framework] * (1.5 if layout == "packed" else 1.0) * (1.2 if precision == "bf16" else 1.0)
    useful = 1000
    label = (f"pdpo_jax-{task}-{layout}-{precision}" if framework == "pdpo_jax"
             else f"{framework}-{task}-{precision}")
    record = dict(bench="train", framework=framework, label=label, task=task, layout=layout,
                  precision=precision, last_layer_selected=framework == "pdpo_jax", compile_s=None,
                  load1_start=0.1, others_cpu_frac=0.0, cpu_steal_frac=0.0)
    steps = [dict(useful=useful, slots=1200, real=1100, head=200)] * 3
    times = [useful / rate * slow] * 3
    return bench.train_workload.finish(record, times, steps, 0.5, {"machine_fp32": 2e11, "machine_bf16": 4e11})


def test_all_runs_every_row_in_rounds_and_reports_the_targets(bench, tmp_path, monkeypatch, capsys):
    bt, calls = bench.bench_train, []
    layouts = {"sft": {"ours-packed": dict(slots=10, real=9, useful=9, padding_share=0.1, non_useful_share=0.1)},
               "dpo": {"torch-dynamic": dict(slots=20, real=18, useful=9, padding_share=0.1, non_useful_share=0.55)}}
    monkeypatch.setattr(bt.tw, "build", lambda path, n: {"layouts": layouts, "sft_encode": "", "dpo_encode": ""})
    monkeypatch.setattr(bt.tw, "settings", lambda: WORKLOAD["settings"])

    def fake_run(cmd, **kw):
        calls.append(cmd)
        slow = 2.0 if len(calls) == 3 else 1.0  # one slow round of one row: the median keeps it out
        out = json.dumps(_record(bench, cmd[1:], slow))
        return types.SimpleNamespace(returncode=0, stdout="{'trl': 'log line'}\n" + out + "\n", stderr="")
    monkeypatch.setattr(bench.bench_dpo.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--rounds", "3", "--alloc", "glibc", "--results", str(tmp_path)])
    bt.main()
    rows, key = len(bt.ROWS), sum(r[3] for r in bt.ROWS)
    assert len(calls) == 1 + rows + 2 * key  # the GEMM peak, every row, the target rows again
    name = lambda c: os.path.basename(c[1]) + " " + " ".join(c[2:8])  # noqa: E731
    first = [name(c) for c in calls[1:1 + rows]]
    second = [name(c) for c in calls[1 + rows:1 + rows + key]]
    assert second == [f for f, r in zip(first, bt.ROWS) if r[3]][::-1]  # odd rounds reversed
    out = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    assert len(out["records"]) == rows and len(out["round_records"]) == rows + 2 * key
    assert {r["rounds"] for r in out["records"]} == {1, 3}
    assert "error" not in json.dumps(out["records"])
    slowed = out["records"][1]  # a target row whose first round ran at half speed
    assert slowed["step_ms_rounds"][0] == pytest.approx(2 * slowed["step_ms_rounds"][1], abs=0.2) and slowed["step_ms"] == slowed["step_ms_rounds"][1]
    t = out["summary"]["targets"]
    # ours packed bf16: 300 * 1.5 * 1.2; the fastest peer, torch bf16: 200 * 1.2
    assert t["dpo"]["peer"] == "torch-dpo-bf16" and t["dpo"]["ratio"] == pytest.approx(2.25) and t["dpo"]["met"]
    assert t["sft"]["peer"] == "torch-sft-bf16" and t["sft"]["ratio"] == pytest.approx(2.25)
    md = next(tmp_path.glob("train-*.md")).read_text()
    assert md.count("| sft |") >= rows // 2 and "torch-dynamic" in md and "≥ 1.5×" in md
    assert "FAILED" not in md


def test_targets_name_the_fastest_peer_and_a_missed_target(bench):
    tw, bt = bench.train_workload, bench.bench_train
    recs = [_record(bench, ["bench_train.py", "--task", "sft", "--layout", "packed", "--precision", "bf16"]),
            _record(bench, ["torch_train.py", "--framework", "torch", "--task", "sft", "--precision", "bf16"]),
            _record(bench, ["torch_train.py", "--framework", "trl", "--task", "sft", "--precision", "fp32"])]
    recs[0]["useful_tok_s"] = 1.2 * recs[1]["useful_tok_s"]
    t = bt.targets(recs)["sft"]
    assert t["peer"] == "torch-sft-bf16" and not t["met"] and t["ratio"] == pytest.approx(1.2)
    assert bt.TARGET == 1.5 and "**no**" in bt.markdown(
        dict(stamp="x", allocator="glibc", command="c", total_wall_s=1, rounds=1, warmup=1, steps=3,
             settings=dict(WORKLOAD["settings"], sft_lr=1e-5, dpo_lr=1e-6), targets={"sft": t},
             workload={"layouts": {}}, noise=bench.bench_dpo.noise(recs)), {}, recs)


def test_counts_of_the_workload(bench):
    tw = bench.train_workload
    w = WORKLOAD
    assert tw.useful_tokens(w, "sft", [0, 1]) == 13 + 12
    assert tw.useful_tokens(w, "dpo", [1, 0]) == (7 + 5 + 2) + (10 + 3 + 4)
    rows = tw.dynamic_rows(w, "dpo", [1, 0])  # chosen rows, then rejected rows, prompt in both
    assert [len(ids) for ids, _ in rows] == [12, 13, 9, 14] and [p for _, p in rows] == [7, 10, 7, 10]
    batch = {"attention_mask": np.ones((2, 128), bool)}
    assert tw.jax_step_shape(w, "sft", batch, packed=False) == dict(slots=256, real=256, head=96, key=(2, 128))
    pc = bench.common.param_counts(tw.MODEL)
    assert tw.step_flops("sft", 100, 10, False) == 6 * (pc["blocks"] * 100 + pc["lm_head"] * 10)
    assert tw.step_flops("dpo", 100, 10, True) == 8 * (pc["blocks"] * 100 + pc["lm_head"] * 10
                                                      - pc["last_layer_queries"] * 90)
    assert tw.model_flops("dpo", 5) == 8 * pc["n_flops"] * 5
