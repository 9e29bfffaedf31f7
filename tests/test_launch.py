"""Every launch script's --dry_run, its argument checks, and the local launcher's process handling.

The dry runs must print commands the trainer accepts: the trainer arguments they carry are
parsed back and loaded with `load_config`, so a script cannot pass flags the trainer never reads.
The local launcher runs a small probe module (one all-reduce across processes) to check the
process count, device count, failure propagation and timeout; the training equality test is
tests/test_multiprocess.py.
"""
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pdpo_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--config", "configs/tiny_sft.yaml", "sft.max_steps=3", "run.out_dir=/shared/runs/a b"]


def _launch(*argv, env=None, timeout=60) -> subprocess.CompletedProcess:
    script = REPO / "launch" / argv[0]
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else ["bash", str(script)]
    return subprocess.run([*cmd, *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _trainer_args(words: list[str]) -> list[str]:
    """The arguments after the trainer module (`-m pdpo_jax.train`, or the worker's MODULE)."""
    assert "pdpo_jax.train" in words, words
    return words[words.index("pdpo_jax.train") + 1:]


def _check_trainer_accepts(args: list[str], distributed: bool):
    assert ("--distributed" in args) == distributed
    args = [a for a in args if a != "--distributed"]
    assert args[0] == "--config"
    cfg = load_config(REPO / args[1], tuple(args[2:]))  # raises on any key the trainer lacks
    assert cfg.sft.max_steps == 3 and cfg.run.out_dir == "/shared/runs/a b"


def test_tpu_pod_dry_run():
    out = _launch("tpu_pod.sh", "--name", "pod-1", "--zone", "us-central2-b", "--project", "p",
                  "--dry_run", "--", *TRAIN_ARGS)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert ["--zone", "us-central2-b"] == words[6:8] and "--worker=all" in words
    remote = shlex.split(words[words.index("--command") + 1])
    assert remote[:3] == ["cd", "~/pdpo_jax", "&&"]
    assert remote[3:6] == [".venv/bin/python", "-m", "pdpo_jax.train"]
    _check_trainer_accepts(_trainer_args(remote), distributed=True)


def test_slurm_dry_run():
    out = _launch("slurm.sh", "--nodes", "4", "--gpus_per_node", "8", "--partition", "a100",
                  "--time", "02:00:00", "--workdir", "/shared/pdpo_jax", "--dry_run", "--",
                  *TRAIN_ARGS)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    directives = {l.split("=")[0]: l.split("=", 1)[1] for l in lines if l.startswith("#SBATCH")}
    assert directives["#SBATCH --nodes"] == "4"
    assert directives["#SBATCH --ntasks-per-node"] == "1"  # one task per host
    assert directives["#SBATCH --gpus-per-node"] == "8"
    assert directives["#SBATCH --partition"] == "a100"
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines  # all GPUs, not SLURM_LOCALID's
    assert "cd /shared/pdpo_jax" in lines
    srun = shlex.split(next(l for l in lines if l.startswith("srun ")))
    _check_trainer_accepts(_trainer_args(srun), distributed=True)
    assert lines[-1].startswith("# would run: sbatch")


def test_local_dry_run():
    out = _launch("local.py", "-n", "3", "-k", "2", "--port", "23456", "--dry_run", "--",
                  *TRAIN_ARGS, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                                 "--xla_backend_optimization_level=0"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[{i}] ")
        words = shlex.split(line[len(f"[{i}] "):])
        env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=")[0].isupper())
        assert env["JAX_COORDINATOR_ADDRESS"] == env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:23456"
        assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", str(i))
        assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        flags = env["XLA_FLAGS"].split()
        # The launcher's device count replaces the caller's; the caller's other flags stay.
        assert [f for f in flags if "device_count" in f] == ["--xla_force_host_platform_device_count=2"]
        assert "--xla_backend_optimization_level=0" in flags
        argv = words[len(env):]
        assert argv[0] == sys.executable and argv[1] == str(REPO / "launch" / "local_worker.py")
        _check_trainer_accepts(_trainer_args(words), distributed=False)


@pytest.mark.parametrize("script, argv, message", [
    ("tpu_pod.sh", ["--zone", "z", "--", *TRAIN_ARGS], "--name"),
    ("tpu_pod.sh", ["--name", "n", "--", *TRAIN_ARGS], "--zone"),
    ("tpu_pod.sh", ["--name", "n", "--zone", "z", "--dry_run"], "no trainer arguments"),
    ("tpu_pod.sh", ["--name", "n", "--zone", "z", "--", "--distributed", *TRAIN_ARGS], "--distributed"),
    ("tpu_pod.sh", ["--name", "n", "--zone", "z", "--bogus"], "unknown option"),
    ("slurm.sh", ["--nodes", "0", "--gpus_per_node", "8", "--", *TRAIN_ARGS], "--nodes"),
    ("slurm.sh", ["--nodes", "2", "--", *TRAIN_ARGS], "--gpus_per_node"),
    ("slurm.sh", ["--nodes", "2", "--gpus_per_node", "8", "--", "sft.max_steps=3"], "--config"),
    ("slurm.sh", ["--nodes", "2", "--gpus_per_node"], "--gpus_per_node needs a value"),
    ("tpu_pod.sh", ["--name", "--", *TRAIN_ARGS], "--name needs a value"),
    ("local.py", ["-n", "0", "--", *TRAIN_ARGS], "--num_processes"),
    ("local.py", ["-k", "0", "--", *TRAIN_ARGS], "--devices_per_process"),
    ("local.py", ["--timeout", "0", "--", *TRAIN_ARGS], "--timeout"),
    ("local.py", ["--", "--distributed", *TRAIN_ARGS], "--distributed"),
    ("local.py", ["-n", "2"], "after `--`"),
])
def test_bad_arguments_are_refused(script, argv, message):
    out = _launch(script, "--dry_run", *argv)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr


# ---------------------------------------------------------------------------------------------
# The local launcher, for real, on a probe module (seconds, not a training run).

PROBE = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mode = sys.argv[1]
    if mode == "sleep":
        time.sleep(600)
    if mode == "fail" and jax.process_index() == 1:
        raise RuntimeError("probe failure in process 1")
    mesh = Mesh(np.array(jax.devices()), ("x",))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print("PROBE", jax.process_index(), jax.process_count(), jax.local_device_count(),
          jax.device_count(), float(total), flush=True)
""")


@pytest.fixture
def probe_env(tmp_path):
    (tmp_path / "pdpo_probe.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "XLA_FLAGS": ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids(stdout: str) -> list[int]:
    return [int(l.rsplit(" ", 1)[1]) for l in stdout.splitlines() if " is pid " in l]


def _assert_gone(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("n, k", [(2, 1), (2, 2)])
def test_local_processes_all_reduce(probe_env, n, k):
    out = _launch("local.py", "-n", str(n), "-k", str(k), "--timeout", "90", "--module",
                  "pdpo_probe", "--", "ok", env=probe_env, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = sorted(l.split() for l in out.stdout.splitlines() if " PROBE " in l)
    # Process i holds k copies of i+1: the global sum is k * (1 + ... + n).
    total = str(float(k * n * (n + 1) // 2))
    assert rows == [[f"[{i}]", "PROBE", str(i), str(n), str(k), str(n * k), total]
                    for i in range(n)]
    _assert_gone(_pids(out.stdout))


def test_local_failure_stops_the_others(probe_env):
    start = time.monotonic()
    out = _launch("local.py", "-n", "2", "--timeout", "90", "--module", "pdpo_probe", "--",
                  "fail", env=probe_env, timeout=120)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "[1] RuntimeError: probe failure in process 1" in out.stdout
    assert "process 1 exited with 1" in out.stderr
    # Process 0 waits in the all-reduce for ever; the launcher must not wait for it.
    assert time.monotonic() - start < 60
    _assert_gone(_pids(out.stdout))


def test_local_timeout_stops_everything(probe_env):
    start = time.monotonic()
    out = _launch("local.py", "-n", "2", "--timeout", "5", "--module", "pdpo_probe", "--",
                  "sleep", env=probe_env, timeout=120)
    assert out.returncode == 124
    assert "timed out after 5 s" in out.stderr
    assert time.monotonic() - start < 60
    _assert_gone(_pids(out.stdout))


def test_srun_environment_is_auto_detected(tmp_path):
    """What the sbatch script relies on: under srun (one task per host), a bare
    `jax.distributed.initialize()` finds the process count and id from SLURM, and
    JAX_LOCAL_DEVICE_IDS keeps every local device (not just SLURM_LOCALID's). Two local
    processes with the variables srun sets, on loopback."""
    probe = ("import jax; jax.distributed.initialize(); "
             "from jax._src import distributed as d, xla_bridge as xb; "
             "print('SLURM', jax.process_index(), jax.process_count(), "
             "d.global_state.coordinator_address, xb.CUDA_VISIBLE_DEVICES.value, flush=True)")
    free = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
               "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(i), "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2",
               "JAX_COORDINATOR_PORT": str(free),
               "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{free}",
               "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
        procs.append(subprocess.Popen([sys.executable, "-c", probe], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, out in enumerate(outs):
        assert procs[i].returncode == 0, out[-3000:]
        assert f"SLURM {i} 2 127.0.0.1:{free} 0,1,2,3" in out


def test_gpu_check_script_parses_its_arguments():
    """bench/gpu_check.py (run on a lent GPU; `--smoke` runs it on tiny shapes anywhere)."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--smoke" in out.stdout and "dpo_step" in out.stdout


def test_offline_gpu_dry_run(tmp_path):
    """launch/offline_gpu.sh: wheels, the GGUF joined from parts and converted, the trainer
    under a time limit, and the archive of the run folder without its weights."""
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "a-1.0-py3-none-any.whl").write_bytes(b"")
    out = _launch("offline_gpu.sh", "--wheels", str(tmp_path / "whl"), "--gguf_parts",
                  str(tmp_path / "m.gguf.part*"), "--sha256", "0" * 64, "--model_dir",
                  str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--limit", "500",
                  "--python", sys.executable, "--dry_run", "--", *TRAIN_ARGS)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    pip, cat, convert, train, tar = lines
    assert pip[1:4] == ["-m", "pip", "install"] and "--no-index" in pip
    assert pip[-1] == str(tmp_path / "whl" / "a-1.0-py3-none-any.whl")
    assert cat[0] == "cat" and convert[1:5] == ["-m", "pdpo_jax.models.gguf_io", "convert", cat[-1]]
    assert convert[5] == str(tmp_path / "model")
    assert train[:5] == ["timeout", "--signal=TERM", "--kill-after=20", "500", sys.executable]
    assert train[train.index("|") + 1:] == ["tee", str(tmp_path / "out" / "train.log")]
    _check_trainer_accepts(_trainer_args(train[:train.index("2>&1")]), distributed=False)
    # the run folder the config names, packed without weights, checkpoints or cached log-probs
    assert tar[:2] == ["tar", "-czf"] and tar[2] == str(tmp_path / "out" / "a b.tar.gz")
    assert {"--exclude=*.safetensors", "--exclude=*/ckpt", "--exclude=*/ref_logps"} <= set(tar)
    assert tar[-3:] == ["-C", "/shared/runs", "a b"]


def test_offline_gpu_refuses_a_damaged_gguf(tmp_path):
    """Parts that do not join into the file the digest names stop the run before converting."""
    for i, chunk in enumerate([b"GGUF", b"rest"]):
        (tmp_path / f"m.gguf.part{i}").write_bytes(chunk)
    out = _launch("offline_gpu.sh", "--wheels", str(tmp_path / "none"), "--gguf_parts",
                  str(tmp_path / "m.gguf.part*"), "--sha256", "0" * 64, "--model_dir",
                  str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                  "--python", sys.executable, "--", *TRAIN_ARGS,
                  env={"TMPDIR": str(tmp_path)})
    assert out.returncode == 2, (out.stdout, out.stderr)
    import hashlib
    assert f"sha256 {hashlib.sha256(b'GGUFrest').hexdigest()}, expected {'0' * 64}" in out.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--gguf", "a.gguf", "--gguf_parts", "p*", "--sha256", "0" * 64], "not both"),
    (["--gguf_parts", "p*"], "--sha256"),
    (["--gguf_parts", "p*", "--sha256", "xyz"], "64-hex-digit"),
    (["--limit", "10m"], "--limit '10m'"),
    (["--out"], "--out needs a value"),
])
def test_offline_gpu_bad_arguments(argv, message):
    out = _launch("offline_gpu.sh", "--dry_run", *argv, "--", *TRAIN_ARGS)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
