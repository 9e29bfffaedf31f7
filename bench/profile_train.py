"""Where a pdpo_jax training step's time goes on XLA:CPU: one bench_train.py row under
jax.profiler, its thunks (one per HLO instruction the CPU runtime executes) summed by kind.

    .venv/bin/python bench/profile_train.py --workload W --task sft --layout packed --precision bf16
        [--steps 3] [--warmup 1] [--remat none|full|dots_saveable] [--unroll true|false]

Builds the step exactly as the bench worker does (bench_train.run_jax's model, pipeline, jit),
compiles it for the plan's first batch, runs `--warmup` steps, then `--steps` steps under
`jax.profiler.trace`, and reads the trace back: every thunk event of the XLA:CPU runtime,
matched to its instruction in the optimized HLO (`compiled.as_text()`). Kinds: matmul (a
fusion or custom call holding a dot; YNNPACK's `ynn_fusion`s are most of them), with the FLOPs
of its dots and so its GFLOP/s; transpose/copy; reduce; elementwise (every other fusion);
other. Prints one JSON line: per kind ms/step, share and GFLOP/s, the 25 most expensive
instructions, and the step's total.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import train_workload as tw  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\((.*)$")
_SHAPE = re.compile(r"(bf16|f32|f16|s32|pred|u8|s8|f64|u32|s64)\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions: name -> dict(opcode, shape, calls, line, comp), computations: name ->
    [names]). Names are unique in a module except fused computations' `param_*`, which are
    looked up inside their computation."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and ("%" in line or "ENTRY" in line):
            current = line.split("(")[0].replace("ENTRY", "").strip().lstrip("%").split()[0]
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        ins = dict(opcode=opcode, shape=shape, calls=calls, line=line.strip()[:300], comp=current)
        instrs.setdefault(name, ins)
        instrs[(current, name)] = ins
        comps[current].append(name)
    return instrs, comps


def dot_flops(ins: dict, instrs: dict) -> int:
    """2 · output elements · contracted size of one `dot` instruction (its operands are printed
    by name: the lhs shape is its definition's, in the dot's computation)."""
    line = ins["line"]
    operands = re.search(r"dot\(%?([\w.\-]+)", line)
    lhs_def = instrs.get((ins["comp"], operands.group(1))) if operands else None
    out_shape = _SHAPE.search(ins["shape"])
    lhs_shape = _SHAPE.search(lhs_def["shape"]) if lhs_def else None
    if out_shape is None or lhs_shape is None:
        return 0
    out, lhs = _dims(out_shape.group(2)), _dims(lhs_shape.group(2))
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    contracted = 1
    for d in _dims(m.group(1)) if m else []:
        contracted *= lhs[d]
    n = 1
    for d in out:
        n *= d
    return 2 * n * contracted


def classify(name: str, instrs: dict, comps: dict) -> tuple[str, int]:
    """(kind, dot FLOPs) of one executed instruction, looking inside what it calls."""
    seen, ops, flops, stack = set(), [], 0, [name]
    while stack:
        key = stack.pop()
        if key in seen or key not in instrs:
            continue
        seen.add(key)
        ins = instrs[key]
        ops.append(ins["opcode"])
        if ins["opcode"] == "dot":
            flops += dot_flops(ins, instrs)
        for c in ins["calls"]:
            stack.extend((c, n) for n in comps.get(c, []))
    if "dot" in ops or "convolution" in ops:
        return "matmul", flops
    if name.startswith(("copy", "transpose")) or set(ops) <= {"copy", "transpose", "bitcast", "parameter"}:
        return "transpose/copy", 0
    if "reduce" in ops or "reduce-window" in ops:
        return "reduce", 0
    if instrs.get(name, {}).get("opcode") == "fusion":
        return "elementwise", 0
    return "other", 0


def thunk_events(trace_dir: str) -> list[tuple[str, float]]:
    """(name, µs) of every XLA:CPU thunk the trace holds (the runtime's own regions left out)."""
    path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))[0]
    with gzip.open(path) as fh:
        trace = json.load(fh)
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or "python" == threads.get((e["pid"], e.get("tid"))):
            continue
        name = e["name"]
        if name.startswith(("end:", "ThreadpoolListener", "ThunkExecutor", "$")) or "::" in name:
            continue
        out.append((name, float(e.get("dur", 0.0))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--task", choices=["sft", "dpo"], default="sft")
    ap.add_argument("--layout", choices=["bucketed", "packed"], default="packed")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--remat", choices=["none", "full", "dots_saveable"], default=None)
    ap.add_argument("--unroll", type=lambda v: v == "true", default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()
    import bench_train
    import jax

    step, state, extra, batches, _ = bench_train.build_jax_step(args, tw.load(args.workload), n_batches=1)
    batch = batches[0]
    compiled = step.lower(state, *extra, batch).compile()
    instrs, comps = parse_hlo(compiled.as_text())
    for _ in range(args.warmup):
        state, metrics = compiled(state, *extra, batch)
        jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(args.steps):
                state, metrics = compiled(state, *extra, batch)
                jax.block_until_ready((state, metrics))
        wall = (time.perf_counter() - t0) / args.steps
        events = thunk_events(tmp)
    by_kind, flops_kind = collections.Counter(), collections.Counter()
    by_instr = collections.Counter()
    for name, us in events:
        kind, fl = classify(name, instrs, comps)
        by_kind[kind] += us / args.steps
        flops_kind[kind] += fl / args.steps
        by_instr[name] += us / args.steps
    total = sum(by_kind.values())
    kinds = {k: dict(ms=round(v / 1e3, 1), share=round(v / total, 3),
                     gflop_s=round(flops_kind[k] / (v * 1e-6) / 1e9, 1) if flops_kind[k] else None)
             for k, v in by_kind.most_common()}
    top = [dict(name=n, ms=round(us / 1e3, 2), kind=classify(n, instrs, comps)[0],
                hlo=instrs.get(n, {}).get("line", "")[:200]) for n, us in by_instr.most_common(args.top)]
    out = dict(task=args.task, layout=args.layout, precision=args.precision, remat=args.remat,
               step_wall_ms=round(wall * 1e3, 1), thunk_ms=round(total / 1e3, 1),
               dot_gflop_per_step=round(flops_kind["matmul"] / 1e9, 1), kinds=kinds, top=top)
    common.emit(out)


if __name__ == "__main__":
    main()
