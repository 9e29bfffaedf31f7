"""bench/bench_dpo.py --all end to end with its worker processes replaced by canned records:
the plan, the record parsing, the target ratios and the report (not a performance test)."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_dpo  # noqa: E402
import common  # noqa: E402

MS = {"pdpo_jax": 300.0, "torch": 400.0, "trl": 800.0}


def _record(cmd: list[str]) -> dict:
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
    return common.finish(record, [ms / 1e3] * 3, 0.5, {"machine_fp32": 2e11, "machine_bf16": 4e11})


def test_all_writes_every_row_and_both_target_tables(tmp_path, monkeypatch, capsys):
    def fake_run(args, **kw):
        return subprocess.CompletedProcess(args, 0, json.dumps(_record(args[1:])) + "\n", "")
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
