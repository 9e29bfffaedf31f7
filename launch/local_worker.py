"""One process of a `launch/local.py` job: join the JAX distributed runtime, then run a module.

    python launch/local_worker.py MODULE [ARGS ...]     (MODULE e.g. pdpo_jax.train)

jax 0.10.2's `jax.distributed.initialize()` reads only JAX_COORDINATOR_ADDRESS from the
environment; the process count and id come from a cluster manager it auto-detects (Cloud TPU,
SLURM, Open MPI, k8s). On one machine there is none, so this passes JAX_NUM_PROCESSES and
JAX_PROCESS_ID explicitly, then runs MODULE as `python -m MODULE ARGS` would (so leave the
trainer's `--distributed` off: initialising twice is an error).
"""
from __future__ import annotations

import os
import runpy
import sys
import traceback


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise SystemExit(f"local_worker: {name}={value!r}; expected a non-negative integer "
                         "(launch/local.py sets it)")
    return int(value)


def _gloo_on(host: str) -> None:
    """Bind gloo's TCP pairs to `host` (by default gloo uses whatever the machine's hostname
    resolves to). Private jax API: if it moved, warn and keep jax's default."""
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax
    except ImportError as e:
        print(f"local_worker: cannot pin gloo to {host} ({e}); using jax's default",
              file=sys.stderr)
        return

    def cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname=host)
        return xla_bridge.make_cpu_client(collectives=collectives)
    xla_bridge.register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)


def _leave(code: int) -> None:
    """Exit now. A normal exit waits in jax.distributed's shutdown barrier for the other
    processes while they wait in a collective for this one, and all hang until a timeout;
    leaving at once lets the launcher see the failure and stop the rest."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    module, args = sys.argv[1], sys.argv[2:]
    if "--distributed" in args:
        raise SystemExit("local_worker: drop --distributed; this worker already initialises "
                         "jax.distributed from JAX_NUM_PROCESSES / JAX_PROCESS_ID")
    import jax

    if os.environ.get("PDPO_GLOO_HOSTNAME"):
        _gloo_on(os.environ["PDPO_GLOO_HOSTNAME"])
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=_env_int("JAX_NUM_PROCESSES"),
                               process_id=_env_int("JAX_PROCESS_ID"))
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        _leave(e.code if isinstance(e.code, int) else 1)
    except BaseException:  # noqa: BLE001 - any failure must end this process now
        traceback.print_exc()
        _leave(1)


if __name__ == "__main__":
    main()
