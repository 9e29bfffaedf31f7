"""The matrix multiplies of one SmolLM2-135M training step, each timed alone in XLA:CPU and in
PyTorch: how fast each framework multiplies at the shapes the step runs, and the step's GEMM
floor, the time it would take if it did nothing but those matmuls at those rates.

    .venv/bin/python bench/gemm_shapes.py [--tokens 1536] [--head 384] [--rounds 3]
        [--reps 20] [--alloc auto|tcmalloc|glibc] [--train-results bench/results/train-X.json]

Shapes: SmolLM2-135M-Instruct (D 576, MLP 1536, 9 query heads and 3 kv heads of 64, vocab
49,152, 30 layers; `SMOLLM2` below). M = `--tokens` through the blocks per step (the SFT bench's
8 rows x 192), and per projection x·W (K → N) three GEMMs: the forward M×K·K×N, the input
gradient M×N·N×K and the weight gradient K×M·M×N; the LM head the same at `--head` positions.
Attention's score and value products (batched, ~6% of the step's FLOPs at 192 tokens) are left
out, so the floor is a lower bound. jax: `jit(jnp.dot)`, bf16 inputs accumulated in fp32 and
rounded to bf16 (how `ops.dense` runs a bf16 projection), and fp32; torch: `torch.mm` (bf16:
oneDNN, as autocast's linear runs; fp32: MKL). Each framework in its own process under one
allocator, `--rounds` rounds in alternating order; a shape's rate is its median call over
`--reps`, best round. floor = sum of FLOPs / rate over the step's GEMMs. With --train-results
(a bench_train.py JSON of the same workload), each SFT row's measured s/step is set against its
framework's floor at its precision: the share of its step the GEMMs alone need.
Writes bench/results/gemm-<stamp>.{json,md}; progress on stderr, the summary as one JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import bench_dpo  # noqa: E402  (find_tcmalloc, worker_env)

SMOLLM2 = dict(d=576, mlp=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, layers=30)
PRECISIONS = ("bf16", "fp32")


def step_gemms(tokens: int, head: int, m: dict = SMOLLM2) -> list[dict]:
    """Every GEMM of one training step: name, (rows, inner, cols) and how often it runs."""
    d, q, kv = m["d"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    projections = [("q", d, q), ("k", d, kv), ("v", d, kv), ("o", q, d), ("gate", d, m["mlp"]),
                   ("up", d, m["mlp"]), ("down", m["mlp"], d)]
    out = []
    for name, K, N, M, count in ([(n, K, N, tokens, m["layers"]) for n, K, N in projections]
                                 + [("lm_head", d, m["vocab"], head, 1)]):
        out += [dict(name=f"{name}.fwd", shape=(M, K, N), count=count),
                dict(name=f"{name}.dx", shape=(M, N, K), count=count),
                dict(name=f"{name}.dW", shape=(K, M, N), count=count)]
    return out


def gemm_flops(g: dict) -> int:
    """FLOPs of one call of GEMM `g` (M×K · K×N)."""
    M, K, N = g["shape"]
    return 2 * M * K * N


def _median_seconds(fn, reps: int) -> float:
    times = common.call_seconds(fn, reps)
    return times[len(times) // 2]


def worker(fw: str, gemms: list[dict], reps: int) -> dict:
    """{precision: {gemm name: FLOP/s}} of one framework."""
    rates = {p: {} for p in PRECISIONS}
    if fw == "jax":
        import jax
        import jax.numpy as jnp
        for p in PRECISIONS:
            dt = jnp.bfloat16 if p == "bf16" else jnp.float32
            dot = jax.jit(lambda a, b, dt=dt: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dt))
            for g in gemms:
                M, K, N = g["shape"]
                a = jax.random.normal(jax.random.key(0), (M, K), dt)
                b = jax.random.normal(jax.random.key(1), (K, N), dt)
                rates[p][g["name"]] = gemm_flops(g) / _median_seconds(lambda: dot(a, b).block_until_ready(), reps)
        return dict(rates=rates, version=jax.__version__)
    import torch
    torch.manual_seed(0)
    for p in PRECISIONS:
        dt = torch.bfloat16 if p == "bf16" else torch.float32
        for g in gemms:
            M, K, N = g["shape"]
            a, b = torch.randn(M, K, dtype=dt), torch.randn(K, N, dtype=dt)
            rates[p][g["name"]] = gemm_flops(g) / _median_seconds(lambda: torch.mm(a, b), reps)
    return dict(rates=rates, version=torch.__version__, threads=torch.get_num_threads())


def floor_seconds(gemms: list[dict], rates: dict[str, float]) -> float:
    return sum(g["count"] * gemm_flops(g) / rates[g["name"]] for g in gemms)


def best_rates(rounds: list[dict]) -> dict:
    """Per framework, precision and GEMM: the best of the rounds' rates."""
    out = {}
    for r in rounds:
        for p, by_name in r["rates"].items():
            slot = out.setdefault(r["fw"], {}).setdefault(p, {})
            for name, rate in by_name.items():
                slot[name] = max(slot.get(name, 0.0), rate)
    return out


def compare(gemms: list[dict], rates: dict, train: dict | None) -> dict:
    flops = sum(g["count"] * gemm_flops(g) for g in gemms)
    out = {"step_gemm_gflop": flops / 1e9, "floor_s": {}, "rate_gflops": {}}
    for fw in rates:
        for p in rates[fw]:
            key = f"{fw}-{p}"
            out["floor_s"][key] = floor_seconds(gemms, rates[fw][p])
            out["rate_gflops"][key] = flops / out["floor_s"][key] / 1e9
    if train:
        rows = {}
        for r in train.get("records", []):
            if r.get("task") != "sft" or "s_per_step" not in r:
                continue
            fw = "torch" if r["framework"] == "torch" else "jax"
            floor = out["floor_s"].get(f"{fw}-{r['precision']}")
            if floor:
                rows[r["label"]] = dict(s_per_step=r["s_per_step"], floor_s=floor,
                                        gemm_share=floor / r["s_per_step"])
        out["train_rows"] = rows
        torch_row = next((v for k, v in rows.items() if k.startswith("torch") and "bf16" in k), None)
        if torch_row and "jax-bf16" in out["floor_s"]:
            out["ceiling_jax_bf16_over_torch_bf16"] = torch_row["s_per_step"] / out["floor_s"]["jax-bf16"]
    return out


def markdown(summary: dict, gemms: list[dict], rates: dict) -> str:
    c = summary["comparison"]
    lines = [f"# GEMMs of one SmolLM2-135M training step {summary['stamp']} "
             f"(allocator: {summary['allocator']})", "",
             f"`{summary['command']}`; M = {summary['tokens']} tokens, LM head at {summary['head']} "
             f"positions; {c['step_gemm_gflop']:.0f} GFLOP of GEMMs per step; {summary['rounds']} "
             "rounds, best round of each shape's median call.", "",
             "| GEMM (M×K·K×N) | per step | " + " | ".join(f"{fw} {p} GFLOP/s" for fw in rates
                                                          for p in rates[fw]) + " |",
             "|---|---|" + "---|" * sum(len(v) for v in rates.values())]
    for g in gemms:
        M, K, N = g["shape"]
        lines.append(f"| {g['name']} {M}×{K}·{K}×{N} | {g['count']} | " + " | ".join(
            f"{rates[fw][p][g['name']] / 1e9:.0f}" for fw in rates for p in rates[fw]) + " |")
    lines += ["", "| framework, precision | step's GEMM floor s | its mean rate GFLOP/s |", "|---|---|---|"]
    lines += [f"| {k} | {c['floor_s'][k]:.3f} | {c['rate_gflops'][k]:.0f} |" for k in c["floor_s"]]
    if c.get("train_rows"):
        lines += ["", f"Measured SFT steps (`{summary['train_results']}`) against their framework's floor:", "",
                  "| row | s/step | GEMM floor s | floor / step |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['s_per_step']:.2f} | {v['floor_s']:.2f} | {v['gemm_share']:.0%} |"
                  for k, v in c["train_rows"].items()]
        if "ceiling_jax_bf16_over_torch_bf16" in c:
            lines += ["", "The most a pdpo_jax bf16 step made of XLA's GEMMs alone could lead the "
                      f"measured PyTorch bf16 step by: **{c['ceiling_jax_bf16_over_torch_bf16']:.2f}×**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--head", type=int, default=384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alloc", default="auto", choices=["auto", "tcmalloc", "glibc"])
    ap.add_argument("--train-results", default=None)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    gemms = step_gemms(args.tokens, args.head)
    if args.worker:
        common.emit(dict(fw=args.worker, **worker(args.worker, gemms, args.reps),
                         allocator=common.allocator()))
        return
    lib = bench_dpo.find_tcmalloc() if args.alloc != "glibc" else None
    if args.alloc == "tcmalloc" and lib is None:
        sys.exit(f"--alloc tcmalloc: {bench_dpo.TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
    env = bench_dpo.worker_env(lib)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rounds = []
    for k in range(args.rounds):
        for fw in (("jax", "torch") if k % 2 == 0 else ("torch", "jax")):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--tokens", str(args.tokens),
                   "--head", str(args.head), "--reps", str(args.reps)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rounds.append(json.loads(p.stdout.strip().splitlines()[-1]))
            common.log(f"[gemm] round {k + 1}/{args.rounds} {fw} done")
    rates = best_rates(rounds)
    train = None
    if args.train_results:
        with open(args.train_results) as f:
            train = json.load(f)
    summary = dict(bench="gemm_shapes", stamp=stamp, command=" ".join(["bench/gemm_shapes.py", *sys.argv[1:]]),
                   allocator="tcmalloc" if lib else "glibc", tokens=args.tokens, head=args.head,
                   rounds=args.rounds, reps=args.reps, train_results=args.train_results, host=common.host(),
                   comparison=compare(gemms, rates, train))
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"gemm-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(dict(summary=summary, gemms=gemms, rates=rates, rounds=rounds), f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(summary, gemms, rates))
    common.log(f"wrote {base}.json and .md")
    common.emit({"summary": summary})


if __name__ == "__main__":
    main()
