"""The machine's measured GEMM peak (2048³, fp32 and bf16 with fp32 accumulation), for MFU.

    .venv/bin/python bench/matmul_peak.py [--out peaks.json]   # jax then torch, own processes
    .venv/bin/python bench/matmul_peak.py --fw jax             # one framework (the workers)

jax: `jit(jnp.dot)` (XLA:CPU). torch: `torch.mm` (fp32 → MKL sgemm, what nn.Linear uses;
bf16 → oneDNN) and, for reference, oneDNN's fp32 Linear (`to_mkldnn`, inference only; it is
faster than MKL on AMD CPUs). The peak of a precision is the best of any of them ("machine");
MFU of every DPO row is taken against the machine peak of its precision. The best of `--reps`
calls is used (the machine is shared: the best call is the one least disturbed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N = 2048
FLOPS = 2.0 * N ** 3


def best_rate(fn, reps: int, warmup: int = 3) -> dict:
    times = common.call_seconds(fn, reps, warmup)
    return dict(best_flops=FLOPS / times[0], median_flops=FLOPS / times[len(times) // 2])


def run_jax(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    a32 = jax.random.normal(jax.random.PRNGKey(0), (N, N), jnp.float32)
    a16 = a32.astype(jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return {"jax_fp32": best_rate(lambda: dot(a32, a32).block_until_ready(), reps),
            "jax_bf16": best_rate(lambda: dot16(a16, a16).block_until_ready(), reps),
            "jax_version": jax.__version__}


def run_torch(reps: int) -> dict:
    import torch
    torch.manual_seed(0)
    a32 = torch.randn(N, N)
    a16 = a32.bfloat16()
    out = {"torch_fp32": best_rate(lambda: torch.mm(a32, a32), reps),
           "torch_bf16": best_rate(lambda: torch.mm(a16, a16), reps),
           "torch_version": torch.__version__, "threads": torch.get_num_threads()}
    import torch.utils.mkldnn as mkldnn
    with torch.no_grad():
        linear = mkldnn.to_mkldnn(torch.nn.Linear(N, N, bias=False).eval())
        x = a32.to_mkldnn()
        out["torch_onednn_fp32"] = best_rate(lambda: linear(x), reps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fw", choices=["jax", "torch"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the merged peaks JSON here")
    args = ap.parse_args()
    if args.fw:
        with common.Meter() as meter:
            res = run_jax(args.reps) if args.fw == "jax" else run_torch(args.reps)
        common.emit({**res, **meter.result, "allocator": common.allocator(),
                     "peak_rss_mib": round(common.peak_rss_mib(), 1)})
        return
    merged = {"bench": "matmul_peak", "n": N, "reps": args.reps, "allocator": common.allocator()}
    for fw in ("jax", "torch"):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--fw", fw, "--reps", str(args.reps)],
                           capture_output=True, text=True, check=True)
        merged[fw] = json.loads(p.stdout.strip().splitlines()[-1])
    for prec in ("fp32", "bf16"):
        rates = {k: v["best_flops"] for fw in ("jax", "torch") for k, v in merged[fw].items()
                 if isinstance(v, dict) and k.endswith(prec)}
        merged[f"machine_{prec}"] = max(rates.values())
        merged[f"machine_{prec}_by"] = max(rates, key=rates.get)
        merged.update({k: v for k, v in rates.items()})
    common.log("[matmul_peak] GFLOP/s (best): " + ", ".join(
        f"{k} {merged[k] / 1e9:.0f}" for k in sorted(merged) if k.endswith(("fp32", "bf16"))
        and isinstance(merged[k], float)))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(merged, fh, indent=1, sort_keys=True)
    common.emit(merged)


if __name__ == "__main__":
    main()
