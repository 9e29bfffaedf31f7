"""SmolLM2-135M SFT and DPO training steps on real persona-chat batches: pdpo_jax (bucketed and
packed, fp32 and bf16) vs a hand-written PyTorch step vs trl's SFTTrainer / DPOTrainer.

    .venv/bin/python bench/bench_train.py [--rounds R] [--quick] [--wait-quiet S] [--alloc auto]
    .venv/bin/python bench/bench_train.py --worker jax --workload W --task dpo --layout packed --precision bf16

The workload (bench/train_workload.py) is built once: the first `max_train_records` records of
the embedded Synthetic-Persona-Chat training split, encoded with SmolLM2's tokenizer and the
`chat` template under configs/smollm2_135m_shuffle.yaml's budgets, and the first batches of
the trainer's epoch-0 plan (8 records, or 8 pairs: chosen = the record's reply, rejected =
another record's). Every worker trains the real SmolLM2-135M-Instruct on exactly those batches,
one process per row, `rounds` rounds with odd rounds reversed; a row reports its median round.
Writes bench/results/train-<stamp>.json (every record) and train-<stamp>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (offline env vars first)
import bench_dpo  # noqa: E402  (worker_env, run_retimed, median_rounds, noise, find_tcmalloc)
import train_workload as tw  # noqa: E402
from pdpo_jax import tables  # noqa: E402

TARGET = 1.5  # packed bf16 useful tok/s over the fastest PyTorch row, SFT and DPO alike


# ---------------------------------------------------------------------------------------------
# pdpo_jax worker: the trainer's own pipeline, model, step and jit


def build_jax_step(args, w: dict, n_batches: int):
    """The trainer's step for `args` (task, layout, precision, unroll, remat) on the plan's first
    `n_batches` batches: (jitted step, state, the arguments between state and batch ((ref_params,)
    for DPO), device batches, `tw.jax_step_shape` of each). Call `synchronous_cpu_dispatch` first."""
    from flax import nnx

    from pdpo_jax import data as pdata
    from pdpo_jax.config import OptimizerConfig
    from pdpo_jax.models import from_pretrained
    from pdpo_jax.models.layers import frozen_forward_params
    from pdpo_jax.sharding import make_mesh
    from pdpo_jax.train.loop import micro_batches
    from pdpo_jax.train.optim import make_optimizer
    from pdpo_jax.train.state import create_state, jit_dpo_step, jit_sft_step, shard_batch
    from pdpo_jax.train.steps import DpoObjective, make_dpo_step, make_sft_step

    s, task, packed = w["settings"], args.task, args.layout == "packed"
    plan = w[f"{task}_plan"][:n_batches]
    builder = pdata.sft_batches if task == "sft" else pdata.preference_batches
    pipeline = builder(tw.examples(w, task), **tw.pipeline_kwargs(w, task, packed))
    host = [pipeline[k] for k in range(len(plan))]
    for k, batch in enumerate(host):  # the same examples as every other framework's batch k
        if batch["index"].tolist() != plan[k]:
            raise RuntimeError(f"batch {k}: pipeline examples {batch['index'].tolist()} != plan {plan[k]}")
    shapes = [tw.jax_step_shape(w, task, b, packed) for b in host]

    mesh = make_mesh()
    model = from_pretrained(tw.smollm2_dir(), mesh=mesh, param_dtype=s["param_dtype"],
                            dtype="bfloat16" if args.precision == "bf16" else "float32",
                            remat=args.remat or s["remat"],
                            unroll_layers=s["unroll_layers"] if args.unroll is None else args.unroll)
    graphdef, params = nnx.split(model)
    lr_value = s["sft_lr"] if task == "sft" else s["dpo_lr"]
    tx, lr = make_optimizer(OptimizerConfig(lr=lr_value, schedule="constant", warmup_ratio=0.0,
                                            weight_decay=s["weight_decay"], clip_norm=s["clip_norm"]),
                            len(plan))
    window = s["max_response_tokens"]
    extra = ()
    if task == "dpo":  # the reference as the DPO stage holds it (stages.run_dpo: `held`)
        extra = (frozen_forward_params(nnx.merge(graphdef, params)),)
    del model
    state, state_sh = create_state(params, tx, mesh)
    if task == "sft":
        jitted = jit_sft_step(make_sft_step(graphdef, tx, lr, window=window), state_sh, mesh)
    else:
        step = make_dpo_step(graphdef, tx, lr, DpoObjective(beta=s["beta"]), window=window,
                             share_prompt=s["share_prompt"])
        jitted = jit_dpo_step(step, state_sh, mesh)
    return jitted, state, extra, [shard_batch(micro_batches(b, 1), mesh) for b in host], shapes


def run_jax(args) -> dict:
    from pdpo_jax.allocator import release_free_memory, synchronous_cpu_dispatch
    synchronous_cpu_dispatch()  # as `python -m pdpo_jax.train` runs; before the CPU client exists
    import jax
    import pdpo_jax

    w = tw.load(args.workload)
    s, task = w["settings"], args.task
    plan = w[f"{task}_plan"][:args.warmup + args.steps]
    jitted, state, extra, batches, shapes = build_jax_step(args, w, len(plan))
    compiled, compile_s = {}, 0.0
    for b, shape in zip(batches, shapes):  # every distinct shape of the plan, ahead of time
        if shape["key"] not in compiled:
            t0 = time.perf_counter()
            compiled[shape["key"]] = jitted.lower(state, *extra, b).compile()
            compile_s += time.perf_counter() - t0
    release_fn = release_free_memory()  # as the training loop does once its step is compiled
    common.reset_peak_rss()
    first_s, times, metrics = 0.0, [], None
    for i in range(args.warmup):
        t0 = time.perf_counter()
        state, metrics = compiled[shapes[i]["key"]](state, *extra, batches[i])
        jax.block_until_ready((state, metrics))
        first_s = first_s or time.perf_counter() - t0
    with common.Meter() as meter:
        for i in range(args.warmup, len(plan)):
            t0 = time.perf_counter()
            state, metrics = compiled[shapes[i]["key"]](state, *extra, batches[i])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    if not bool(metrics["finite"]):
        raise RuntimeError(f"non-finite step: loss {float(metrics['loss'])}")
    steps = [dict(useful=tw.useful_tokens(w, task, plan[i]), **{k: shapes[i][k] for k in ("slots", "real", "head")})
             for i in range(args.warmup, len(plan))]
    unroll = s["unroll_layers"] if args.unroll is None else args.unroll
    remat = args.remat or s["remat"]
    label = f"pdpo_jax-{task}-{args.layout}-{args.precision}"
    label += "" if unroll == s["unroll_layers"] else ("-unrolled" if unroll else "-scan")
    label += "" if remat == s["remat"] else f"-remat_{remat}"
    record = dict(bench="train", framework="pdpo_jax", label=label, task=task, layout=args.layout,
                  precision=args.precision, unroll_layers=unroll, remat=remat,
                  share_prompt=task == "dpo" and s["share_prompt"],
                  last_layer_selected=bool(unroll), compile_s=round(compile_s, 2),
                  compiled_shapes=len(compiled), release_fn=release_fn,
                  final_loss=float(metrics["loss"]), jax_version=jax.__version__,
                  **bench_dpo.source_of(pdpo_jax), **meter.result)
    return tw.finish(record, times, steps, first_s, common.load_peaks(args.peaks))


# ---------------------------------------------------------------------------------------------
# The plan: every row in its own process, in rounds


ROWS = [  # (framework, task, extra args, every round?): interleaved so slow spells hit every
    # framework; the rows the targets compare (ours packed bf16, the hand-written bf16 step: the
    # fastest PyTorch row in every trial run) run in every round, the others in the first
    *[r for task in ("sft", "dpo") for r in (
        ("jax", task, ["--layout", "packed", "--precision", "bf16"], True),
        ("torch", task, ["--precision", "bf16"], True),
        ("trl", task, ["--precision", "bf16"], False),
        ("jax", task, ["--layout", "bucketed", "--precision", "bf16"], False),
        ("jax", task, ["--layout", "packed", "--precision", "fp32"], False),
        ("torch", task, ["--precision", "fp32"], False),
        ("trl", task, ["--precision", "fp32"], False),
        ("jax", task, ["--layout", "bucketed", "--precision", "fp32"], False))],
]
SCRIPTS = {"jax": [os.path.abspath(__file__), "--worker", "jax"],
           "torch": [os.path.join(HERE, "torch_train.py"), "--framework", "torch"],
           "trl": [os.path.join(HERE, "torch_train.py"), "--framework", "trl"]}


def run_all(args) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.results, exist_ok=True)
    lib = bench_dpo.find_tcmalloc() if args.alloc != "glibc" else None
    if args.alloc == "tcmalloc" and lib is None:
        sys.exit(f"--alloc tcmalloc: {bench_dpo.TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
    env = bench_dpo.worker_env(lib, HERE)
    rounds = args.rounds or (1 if args.quick else 3)
    n_batches = args.warmup + args.steps
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workload = os.path.join(tmp, "workload.json")
        info = tw.build(workload, n_batches)
        common.log(f"[workload] {json.dumps(info['layouts'])}")
        peaks_path = os.path.join(args.results, f"peaks-{stamp}.json")
        peaks = bench_dpo.run_worker([os.path.join(HERE, "matmul_peak.py"), "--out", peaks_path], env,
                                     "peak", args.timeout, args.wait_quiet)
        if "error" in peaks:
            sys.exit(f"matmul_peak failed: {peaks['stderr_tail']}")
        timed = []
        for r in range(rounds):
            rows = [row for row in ROWS if row[1] in args.tasks.split(",")
                    and (r == 0 or row[3] or args.all_rounds)]
            for fw, task, extra, _ in rows[::-1 if r % 2 else 1]:
                cmd = [*SCRIPTS[fw], "--task", task, *extra, "--workload", workload, "--peaks", peaks_path,
                       "--warmup", str(args.warmup), "--steps", str(args.steps)]
                record = bench_dpo.run_retimed(cmd, env, "train", args.timeout, args.wait_quiet,
                                               args.retries, bench="train")
                record.update(round=r, cmd=" ".join(c for c in record["cmd"].split() if c != workload))
                timed.append(record)
                print(json.dumps(record, sort_keys=True), flush=True)
                common.log(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{rounds} "
                           f"{record.get('label', record.get('error')):32s} {record.get('step_ms')} ms/step "
                           f"{record.get('useful_tok_s', 0):.0f} useful tok/s  rss {record.get('peak_rss_mib')}  "
                           f"others {record.get('others_cpu_frac')}  ({record['process_wall_s']} s)")
                if "error" in record:
                    common.log(record["stderr_tail"][-1500:])
    records = bench_dpo.median_rounds(timed)
    summary = dict(stamp=stamp, allocator="tcmalloc" if lib else "glibc", command=" ".join(sys.argv),
                   total_wall_s=round(time.perf_counter() - t_start, 1), rounds=rounds,
                   warmup=args.warmup, steps=args.steps, workload=info, settings=tw.settings(),
                   targets=targets(records),
                   noise=bench_dpo.noise(timed, name=lambda r: f"{r['label']} round {r['round'] + 1}"))
    base = os.path.join(args.results, f"train-{stamp}")
    with open(base + ".json", "w") as fh:
        json.dump(dict(summary=summary, peaks=peaks, records=records, round_records=timed), fh,
                  indent=1, sort_keys=True)
    table = markdown(summary, peaks, records)
    with open(base + ".md", "w") as fh:
        fh.write(table)
    print(json.dumps({"summary": summary}, sort_keys=True), flush=True)
    print(table)
    common.log(f"wrote {base}.json and .md ({summary['total_wall_s']} s)")


def targets(records: list[dict]) -> dict:
    """Per task: pdpo_jax packed bf16 vs the fastest PyTorch row (hand-written or trl, any
    precision) in useful tokens/s (target ≥ 1.5×), and its peak RSS vs that row's (≤)."""
    out = {}
    ok = [r for r in records if "useful_tok_s" in r]
    for task in ("sft", "dpo"):
        ours = [r for r in ok if r["task"] == task and r["framework"] == "pdpo_jax"
                and r["layout"] == "packed" and r["precision"] == "bf16"]
        peers = [r for r in ok if r["task"] == task and r["framework"] in ("torch", "trl")]
        if not ours or not peers:
            continue
        a, b = ours[0], max(peers, key=lambda r: r["useful_tok_s"])
        best = max((r for r in ok if r["task"] == task and r["framework"] == "pdpo_jax"),
                   key=lambda r: r["useful_tok_s"])
        ratio = a["useful_tok_s"] / b["useful_tok_s"]
        out[task] = dict(ours=a["label"], peer=b["label"], ours_tok_s=a["useful_tok_s"],
                         peer_tok_s=b["useful_tok_s"], ratio=round(ratio, 3), target=TARGET,
                         met=bool(ratio >= TARGET), ours_rss_mib=a["peak_rss_mib"],
                         peer_rss_mib=b["peak_rss_mib"], rss_met=bool(a["peak_rss_mib"] <= b["peak_rss_mib"]),
                         ours_steps_rss_mib=a.get("steps_peak_rss_mib"), peer_steps_rss_mib=b.get("steps_peak_rss_mib"),
                         best_ours=best["label"], best_ratio=round(best["useful_tok_s"] / b["useful_tok_s"], 3))
    return out


COLUMNS = ["task", "row", "precision", "layout", "useful tok/s", "ms/step", "rounds ms", "MFU",
           "MFU(N·useful)", "padding", "compile s", "peak RSS MiB", "steps RSS MiB", "others"]


def markdown(summary: dict, peaks: dict, records: list[dict]) -> str:
    g = lambda key: (peaks.get(key) or 0) / 1e9  # noqa: E731
    s = summary["settings"]
    lines = [
        f"# Training-step benchmark {summary['stamp']}: SmolLM2-135M on real persona-chat batches "
        f"(allocator: {summary['allocator']})", "",
        f"`{summary['command']}` — {summary['total_wall_s']:.0f} s; {summary['rounds']} rounds of one "
        f"process per row (odd rounds reversed; a row shows its median round; the rows the targets "
        f"compare run in every round, the others in the first unless --all-rounds), {summary['warmup']} "
        f"warm-up + {summary['steps']} timed steps, each step its own batch. GEMM 2048³ peak "
        f"(GFLOP/s): fp32 {g('machine_fp32'):.0f}, bf16 {g('machine_bf16'):.0f}.", "",
        f"Workload: `{s['config']}` — {s['template']} template, max_total_tokens {s['max_total_tokens']}, "
        f"max_response_tokens {s['max_response_tokens']}, buckets {s['buckets']}, batch "
        f"{s['sft_batch']} records (SFT) / {s['dpo_batch']} pairs (DPO), pack length "
        f"{s['sft_pack_length']} / {s['dpo_pack_length']}; DPO β {s['beta']}, shared prompt "
        f"{s['share_prompt']}, reference held (frozen_forward_params).", "",
        "useful tok/s = median over the timed steps of (prompt + response tokens, DPO prompt + chosen + "
        "rejected, of the step's batch) / step time. MFU = executed FLOPs (blocks on every token slot, "
        "padding included; LM head where the row runs it) / step / GEMM peak of the precision; "
        "MFU(N·useful) credits 6·N (SFT) or 8·N (DPO) per useful token. padding = 1 − real tokens / "
        "token slots of the row's layout.", "",
        *tables.table_head(COLUMNS)]
    for r in records:
        if "useful_tok_s" not in r:
            lines.append(tables.table_row(["", f"FAILED `{r.get('cmd')}` ({r.get('error')})"], len(COLUMNS)))
            continue
        lines.append(tables.table_row([
            r["task"], r["label"], r["precision"], r.get("layout", ""), f"{r['useful_tok_s']:.0f}",
            f"{r['step_ms']:.0f}", " / ".join("–" if m is None else f"{m:.0f}" for m in r.get("step_ms_rounds", [r["step_ms"]])),
            f"{r.get('mfu', 0):.1%}", f"{r.get('mfu_useful', 0):.1%}", f"{r['padding_share']:.1%}",
            "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
            bench_dpo._mib(r.get("steps_peak_rss_mib")), f"{r['others_cpu_frac']:.0%}"]))
    lines += ["", f"Targets: pdpo_jax packed bf16 useful tok/s ≥ {TARGET}× the fastest PyTorch row "
              "(hand-written or trl, any precision); its peak RSS (whole process) ≤ that row's.", "",
              *tables.table_head(["task", "ours", "fastest PyTorch", "ratio", "target", "met",
                                  "peak RSS MiB (ours / peer)", "RSS met", "best pdpo_jax row (ratio)"])]
    for task, t in summary["targets"].items():
        lines.append(tables.table_row([
            task, f"{t['ours']} ({t['ours_tok_s']:.0f})", f"{t['peer']} ({t['peer_tok_s']:.0f})",
            f"{t['ratio']:.2f}×", f"≥ {t['target']}×", "yes" if t["met"] else "**no**",
            f"{t['ours_rss_mib']:.0f} / {t['peer_rss_mib']:.0f}", "yes" if t["rss_met"] else "**no**",
            f"{t['best_ours']} ({t['best_ratio']:.2f}×)"]))
    lines += ["", "Padding share of each layout over the plan's batches (real = tokens in the rows; "
              "useful = prompt + response, DPO prompt once):", "",
              *tables.table_head(["task", "layout", "token slots", "real", "useful", "padding", "non-useful"])]
    for task, lay in summary["workload"]["layouts"].items():
        for name, v in lay.items():
            lines.append(tables.table_row([task, name, v["slots"], v["real"], v["useful"],
                                           f"{v['padding_share']:.1%}", f"{v['non_useful_share']:.1%}"]))
    lines += ["", common.noise_line(summary["noise"], "rounds"), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def worker_args(ap: argparse.ArgumentParser) -> None:
    """The flags every worker takes (torch_train.py too)."""
    ap.add_argument("--workload", help="JSON written by train_workload.build")
    ap.add_argument("--task", choices=["sft", "dpo"], default="sft")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peaks", default=None, help="peaks JSON written by matmul_peak.py")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["jax"])
    ap.add_argument("--layout", choices=["bucketed", "packed"], default="packed")
    ap.add_argument("--unroll", type=lambda v: v == "true", default=None,
                    help="override model.unroll_layers (true/false)")
    ap.add_argument("--remat", choices=["none", "full", "dots_saveable"], default=None,
                    help="override model.remat (the config's: none)")
    worker_args(ap)
    ap.add_argument("--tasks", default="sft,dpo")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--all-rounds", action="store_true",
                    help="every row in every round (default: the target rows; the others once)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--alloc", default="auto", choices=["auto", "tcmalloc", "glibc"])
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each worker, wait up to S s for other processes to use < 10%% CPU")
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.worker == "jax":
        record = run_jax(args)
        common.log(f"[{record['label']}] {record['step_ms']} ms/step, {record['useful_tok_s']:.0f} useful "
                   f"tok/s, compile {record['compile_s']} s, rss {record['peak_rss_mib']} MiB")
        common.emit(record)
        return
    if not os.path.exists(os.path.join(tw.smollm2_dir(), "model.safetensors")):
        sys.exit(f"no SmolLM2-135M folder at {tw.smollm2_dir()} (set PDPO_SMOLLM2_DIR; "
                 "bash ../shared/models/build_smollm2.sh builds it)")
    run_all(args)


if __name__ == "__main__":
    main()
