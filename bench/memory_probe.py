"""Where a training step's memory goes: XLA's own accounting of the compiled SmolLM2-135M SFT
and DPO steps (the trainer's step, on bench_train's real persona-chat batches), per variant of
the layer loop (model.remat × model.unroll_layers) and precision. No step is run: the numbers
are the compiled program's (`Compiled.memory_analysis()`): arguments (params and optimizer
state; donated, so the outputs alias them), and temp, XLA's one preallocated buffer for
everything else live at the step's peak (gradients, activations, the update's temporaries).
Peak memory of a step ≈ arguments + temp + the runtime.

    .venv/bin/python bench/memory_probe.py [--tasks sft,dpo] [--precisions bf16]
        [--variants none:1,full:1,full:0,dots_saveable:0]   (remat:unroll)

Writes bench/results/memory-<stamp>.json and .md. Each variant compiles in its own process
(bench_train's worker builder), ~30 s each on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (offline env vars first)
import train_workload as tw  # noqa: E402
from pdpo_jax import tables  # noqa: E402

FIELDS = ("argument", "output", "alias", "temp")


def worker(args) -> dict:
    import jax

    import bench_train
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()
    w = tw.load(args.workload)
    step_args = argparse.Namespace(task=args.task, layout="packed", precision=args.precision,
                                   remat=args.remat, unroll=args.unroll == "1")
    jitted, state, extra, batches, _ = bench_train.build_jax_step(step_args, w, 1)
    m = jitted.lower(state, *extra, batches[0]).compile().memory_analysis()
    mib = {f: round(getattr(m, f"{f}_size_in_bytes") / 2**20) for f in FIELDS}
    return dict(task=args.task, precision=args.precision, remat=args.remat,
                unroll_layers=args.unroll == "1", backend=jax.default_backend(),
                state_mib=round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20), **mib)


def main(args) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        workload = os.path.join(tmp, "workload.json")
        tw.build(workload, 1, config=args.config)
        for task in args.tasks.split(","):
            for precision in args.precisions.split(","):
                for variant in args.variants.split(","):
                    remat, unroll = variant.split(":")
                    cmd = [sys.executable, __file__, "--worker", "--workload", workload, "--task", task,
                           "--precision", precision, "--remat", remat, "--unroll", unroll]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    records.append(json.loads(out.strip().splitlines()[-1]))
                    common.log(f"[memory] {records[-1]}")
    header = ["task", "precision", "remat", "unroll_layers", "state MiB", "temp MiB",
              "state + temp MiB"]
    rows = [[r["task"], r["precision"], r["remat"], str(r["unroll_layers"]), str(r["state_mib"]),
             str(r["temp"]), str(r["state_mib"] + r["temp"])] for r in records]
    md = (f"# Training-step memory {stamp}: SmolLM2-135M-Instruct, XLA's accounting of the compiled step\n\n"
          f"`bench/memory_probe.py {' '.join(sys.argv[1:])}` — workload: `{args.config}` (bench_train's first "
          "batch, packed rows). state = params + optimizer state (donated: the outputs alias them); "
          "temp = everything else live at the step's peak.\n\n" + tables.markdown_table(header, rows) + "\n")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    base = os.path.join(HERE, "results", f"memory-{stamp}")
    with open(base + ".json", "w") as fh:
        json.dump(dict(bench="memory", stamp=stamp, argv=sys.argv[1:], records=records), fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=tw.CONFIG)
    ap.add_argument("--tasks", default="sft,dpo")
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--variants", default="none:1,full:1,full:0,dots_saveable:0")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload")
    ap.add_argument("--task")
    ap.add_argument("--precision")
    ap.add_argument("--remat")
    ap.add_argument("--unroll")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
    else:
        main(a)
