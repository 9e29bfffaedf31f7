#!/usr/bin/env python3
"""N JAX processes on this machine, joined by JAX's distributed runtime over loopback.

    python launch/local.py -n 2 [-k 1] [--port 0] [--timeout 600] [--dry_run] \\
        -- --config configs/tiny_sft.yaml sft.max_steps=3

Everything after `--` goes to `python -m pdpo_jax.train` (use --module for another entry point).
Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (process 0 hosts the coordinator, bound to
loopback only), JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, CPU collectives over gloo and
XLA_FLAGS=--xla_force_host_platform_device_count=K, so the job sees N*K CPU devices in all.
Each process runs launch/local_worker.py, which passes these to jax.distributed.initialize()
(jax 0.10.2 reads only the coordinator address from the environment) and then runs the module.
Output lines are prefixed `[i]`. The launcher waits for every process; when one fails (or
--timeout passes) the others are stopped and the exit status is the first failure's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "local_worker.py")
LOOPBACK = "127.0.0.1"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    else:
        rest = []
    p = argparse.ArgumentParser(prog="launch/local.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num_processes", type=int, default=2)
    p.add_argument("-k", "--devices_per_process", type=int, default=1,
                   help="fake CPU devices per process (XLA_FLAGS)")
    p.add_argument("--port", type=int, default=0, help="coordinator port; 0 picks a free one")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before every process is stopped and the launch fails")
    p.add_argument("--module", default="pdpo_jax.train", help="python -m MODULE in each process")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.num_processes < 1:
        p.error(f"--num_processes {args.num_processes}: expected at least 1")
    if args.devices_per_process < 1:
        p.error(f"--devices_per_process {args.devices_per_process}: expected at least 1")
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port}: expected 0 (pick a free one) or 1..65535")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout}: expected seconds > 0")
    if "--distributed" in rest:
        p.error("leave --distributed off: each process joins the runtime through "
                "launch/local_worker.py, which passes the process count and id explicitly")
    if args.module == "pdpo_jax.train" and "--config" not in rest and not any(
            a.startswith("--config=") for a in rest):
        p.error("pass the trainer's arguments after `--`, e.g. -- --config configs/tiny_sft.yaml")
    return args, rest


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, k: int, port: int, xla_flags: str = "") -> dict[str, str]:
    """The variables this launcher sets for process i of n (k devices each); `xla_flags` are
    the caller's XLA_FLAGS, kept after ours, except their device count."""
    # XLA:CPU's concurrency-optimised scheduler lets the devices of one process reach
    # independent collectives in different orders; with few cores they then wait on each
    # other for ever (seen with 2 devices on 2 cores).
    ours = [f"--xla_force_host_platform_device_count={k}",
            "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    theirs = [f for f in xla_flags.split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    return {"JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"{LOOPBACK}:{port}",
            "JAX_COORDINATOR_BIND_ADDRESS": f"{LOOPBACK}:{port}",
            "JAX_NUM_PROCESSES": str(n),
            "JAX_PROCESS_ID": str(i),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "PDPO_GLOO_HOSTNAME": LOOPBACK,
            "XLA_FLAGS": " ".join([*ours, *theirs])}


def commands(args, rest: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """[(argv, the variables set on top of this environment)] for every process."""
    argv = [args.python, WORKER, args.module, *rest]
    xla_flags = os.environ.get("XLA_FLAGS", "")
    return [(argv, process_env(i, args.num_processes, args.devices_per_process, port, xla_flags))
            for i in range(args.num_processes)]


def _pump(i: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(f"[{i}] ".encode() + line)
            sys.stdout.buffer.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every live process, then SIGKILL what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.send_signal(sig)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run()'s `finally`, which stops the workers


def run(args, rest: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    port = args.port or free_port()
    procs, pumps, lock = [], [], threading.Lock()
    try:
        for i, (argv, env) in enumerate(commands(args, rest, port)):
            p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            procs.append(p)
            print(f"launch/local.py: process {i} is pid {p.pid}", flush=True)
            t = threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True)
            t.start()
            pumps.append(t)
        deadline = time.monotonic() + args.timeout
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is None and time.monotonic() > deadline:
                print(f"launch/local.py: timed out after {args.timeout:.0f} s; stopping all "
                      "processes", file=sys.stderr)
                return 124
            time.sleep(0.2)
        if failed is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            print(f"launch/local.py: process {failed} exited with {procs[failed].returncode}; "
                  "stopping the others", file=sys.stderr)
            rc = procs[failed].returncode
            return rc if rc > 0 else 128 - rc  # killed by signal -rc
        return 0
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        port = args.port or 12345
        for i, (argv_i, env) in enumerate(commands(args, rest, port)):
            assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"[{i}] {assigns} {shlex.join(argv_i)}")
        return 0
    return run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
