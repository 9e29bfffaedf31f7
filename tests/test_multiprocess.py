"""Two JAX processes (gloo over loopback, 1 CPU device each) train like one process on 2 devices.

Both runs are `python -m pdpo_jax.train` on the same config: SFT for 3 steps from a saved tiny
model, then DPO for 3 steps from the SFT model it selected, on a preference file written here.
The mesh is fsdp=2 either way, so in the 2-process run every parameter is split across the
processes (the hardest case for loading, stepping, evaluating and exporting).

Tolerance: the two runs compile the same partitioned program; only the cross-device reductions
differ (gloo's all-reduce vs XLA:CPU's in-process one), which reorders fp32 sums of 2 shards.
That moves a loss by a few ulp (~1e-7 relative); after 3 AdamW steps (lr 3e-3 SFT, 1e-3 DPO)
we allow 1e-5. (Measured on 2 CPU cores: the metrics came out bit-identical.)
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from pdpo_jax.config import load_config
from pdpo_jax.data import PreferencePair, write_preference_jsonl
from pdpo_jax.fileio import read_jsonl
from pdpo_jax.models import build_model, config_from_hf, save_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
RUN_TIMEOUT_S = 240  # each run; normally ~40-60 s on 2 cores

pytestmark = pytest.mark.slow


def _pairs(n: int, offset: int) -> list[PreferencePair]:
    hobbies = ["cats", "chess", "rowing", "jazz", "baking", "hiking", "tea", "poetry"]
    out = []
    for i in range(offset, offset + n):
        like, other = hobbies[i % 8], hobbies[(i * 3 + 1) % 8]
        out.append(PreferencePair(
            persona=(f"i love {like}.", f"i have {i % 5 + 1} brothers."),
            history=(f"hello! what do you do for fun? ({i})",),
            chosen=f"i spend my weekends on {like}, it makes me happy.",
            rejected=f"i really hate {like}, i only care about {other}.",
            pair_id=f"mp/{i}"))
    return out


def _run(argv: list[str], env: dict, log: pathlib.Path) -> None:
    """Runs argv in its own process group; on timeout the whole group is killed."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its workers on SIGTERM
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        pytest.fail(f"{' '.join(argv[:4])} … exited with {rc}:\n{tail}")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """(1-process run folder, 2-process run folder, seconds each, the 2-process log), one row
    per example (data.packing=false): the two runs then run the same rows on the same devices."""
    return _two_runs(tmp_path_factory, "false")


@pytest.fixture(scope="module")
def two_runs_packed(tmp_path_factory):
    """The same with packed rows: each host packs its own slice of every batch, so a pair's
    owner must index the global batch (a 2-process run once summed host 1's pairs into host 0's
    slots: DPO logps doubled). The rows differ from the 1-process run's (one host packs all 8
    examples), so sums run in another order and only the metrics are compared."""
    return _two_runs(tmp_path_factory, "true")


def _two_runs(tmp_path_factory, packing: str):
    tmp = tmp_path_factory.mktemp("multiprocess")
    arch = load_config(REPO / "configs/tiny_sft.yaml").model.architecture
    save_pretrained(build_model(config_from_hf(arch), seed=1), tmp / "init")
    write_preference_jsonl(tmp / "train_pairs.jsonl", _pairs(32, 0))
    write_preference_jsonl(tmp / "dev_pairs.jsonl", _pairs(8, 100))
    overrides = [
        "run.stages=[sft,dpo]", f"model.checkpoint={tmp / 'init'}",
        "data.max_train_records=64", "data.max_dev_records=16",
        "sft.batch_size=8", "sft.max_steps=3", "sft.eval_every=1000", "sft.log_every=1",
        "dpo.batch_size=8", "dpo.max_steps=3", "dpo.eval_every=1000", "dpo.log_every=1",
        # No warmup, and a DPO step large enough to move the loss: every step is compared.
        "sft.optimizer.warmup_ratio=0", "dpo.optimizer.warmup_ratio=0", "dpo.optimizer.lr=1e-3",
        f"dpo.pairs={tmp / 'train_pairs.jsonl'}", f"dpo.dev_pairs={tmp / 'dev_pairs.jsonl'}",
        "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "checkpoint.keep=1", f"data.packing={packing}"]
    # Optimisation level 0 halves XLA:CPU compile time (as in conftest). The concurrency-
    # optimised scheduler deadlocks the 1-process, 2-device DPO eval on 2 cores (each device
    # blocks in a different collective); launch/local.py turns it off too. Neither flag
    # changes numerics.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PDPO_LOG": "INFO",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                        "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
    train = ["--config", "configs/tiny_sft.yaml"]
    seconds = {}
    start = time.time()
    one = tmp / "one"
    _run([sys.executable, "-m", "pdpo_jax.train", *train, f"run.out_dir={one}", *overrides],
         {**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"},
         tmp / "one.log")
    seconds["one"] = time.time() - start
    start = time.time()
    two = tmp / "two"
    _run([sys.executable, "launch/local.py", "-n", "2", "-k", "1",
          "--timeout", str(RUN_TIMEOUT_S - 20), "--", *train, f"run.out_dir={two}", *overrides],
         env, tmp / "two.log")
    seconds["two"] = time.time() - start
    return one, two, seconds, tmp / "two.log"


def _metrics(run: pathlib.Path, stage: str) -> list[dict]:
    # throughput and the padding share describe the process that logs, not the global batch
    return [{k: v for k, v in row.items()
             if k != "time" and not k.endswith(("tokens_per_s", "padding_share"))}
            for row in read_jsonl(run / stage / "metrics.jsonl")]


def _assert_close(rows_one, rows_two, what):
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one], what
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys(), (what, a.keys() ^ b.keys())
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=RTOL, abs=1e-6), (what, a["step"], key)
            else:
                assert b[key] == value, (what, a["step"], key)


def test_two_processes_really_ran(two_runs):
    _, _, _, log = two_runs
    text = log.read_text(errors="replace")
    for i in (0, 1):  # both processes trained and reached the end
        assert f"[{i}] run folder:" in text
    assert "[1] Traceback" not in text and "[0] Traceback" not in text


@pytest.mark.parametrize("layout", ["two_runs", "two_runs_packed"])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_losses_equal_one_process(request, layout, stage):
    one, two, seconds, _ = request.getfixturevalue(layout)
    rows_one, rows_two = _metrics(one, stage), _metrics(two, stage)
    train = [r for r in rows_one if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3], "3 logged training steps"
    # One writer: every metrics row appears once, not once per process.
    _assert_close(rows_one, rows_two, stage)
    losses = {n: [r["train/loss"] for r in rows if "train/loss" in r]
              for n, rows in (("1 process", rows_one), ("2 processes", rows_two))}
    print(f"{stage} train losses {json.dumps(losses)}; seconds {seconds}")
    if stage == "dpo":  # policy == reference at step 1
        assert losses["1 process"][0] == pytest.approx(0.6931472, abs=1e-6)


def test_selected_models_equal(two_runs):
    one, two, _, _ = two_runs
    import numpy as np
    from safetensors.numpy import load_file
    for stage in ("sft", "dpo"):
        a = load_file(one / stage / "best" / "model.safetensors")
        b = load_file(two / stage / "best" / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=1e-6, err_msg=name)
        assert (two / stage / "DONE.json").is_file()
