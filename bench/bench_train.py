"""SmolLM2-135M SFT and DPO training steps on real persona-chat batches: pdpo_jax with packed
rows and with padded length buckets (data.packing on / off), bf16 and fp32, vs a hand-written
PyTorch step (bf16 autocast, rows padded to the batch's longest), all on the same batches.

    .venv/bin/python bench/bench_train.py [--warmup 1 --steps 6] [--retries 0] [--alloc auto]
        [--config configs/smollm2_135m_shuffle.yaml] [--peers torch-bf16,torch-fp32,trl-bf16]
    .venv/bin/python bench/bench_train.py --worker jax --workload W --task dpo --layout packed --precision bf16

The workload (bench/train_workload.py) is built once: the config's drawn train records of the
embedded Synthetic-Persona-Chat split, encoded with SmolLM2's tokenizer and template under the
config's budgets and data.truncation, and the first warm-up + steps batches of the trainer's
epoch-0 plan (batch_size records, or pairs: chosen = the record's reply, rejected = another
record's). Every worker trains the real SmolLM2-135M-Instruct on exactly those batches, one
process per row (`--rounds R`: R rounds, odd rounds reversed, a row reports its median round).
Reported per row: useful tokens/s (prompt + response tokens; no padding), s/step, the padding
share of the row's layout, MFU, compile time, peak RSS, and the machine's load. Writes
bench/results/train-<stamp>.json (every record) and train-<stamp>.md.
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

# ---------------------------------------------------------------------------------------------
# pdpo_jax worker: the trainer's own pipeline, model, step and jit


def build_jax_step(args, w: dict, n_batches: int, mesh=None):
    """The trainer's step for `args` (task, layout, precision, unroll, remat) on the plan's first
    `n_batches` batches: (jitted step, state, the arguments between state and batch ((ref_params,)
    for DPO), device batches, `tw.jax_step_shape` of each). Call `synchronous_cpu_dispatch` first.
    `mesh`: default every device (`make_mesh()`), as the trainer's default mesh."""
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

    mesh = mesh or make_mesh()
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


def rows(tasks: list[str], peers: list[str]) -> list[tuple[str, str, list[str]]]:
    """(framework, task, arguments) of every row: per task pdpo_jax packed and bucketed at bf16
    and fp32, and the PyTorch peers (`peers`: torch-bf16, the default, torch-fp32, trl-bf16,
    trl-fp32), interleaved so a slow spell of the machine does not hit one layout alone."""
    out = []
    for task in tasks:
        for precision in ("bf16", "fp32"):
            for layout in ("packed", "bucketed"):
                out.append(("jax", task, ["--layout", layout, "--precision", precision]))
            out += [(fw, task, ["--precision", precision]) for fw in ("torch", "trl")
                    if f"{fw}-{precision}" in peers]
    return out


SCRIPTS = {"jax": [os.path.abspath(__file__), "--worker", "jax"],
           "torch": [os.path.join(HERE, "torch_train.py"), "--framework", "torch"],
           "trl": [os.path.join(HERE, "torch_train.py"), "--framework", "trl"]}


def machine_load() -> dict:
    """The machine while the bench starts or ends: load averages, memory, and every other
    process that used ≥ 5 % of a CPU since it started (pid, nice, CPU share, RSS, command) — the
    machine may be shared, and a long job at nice 19 still takes what our workers leave idle."""
    out = dict(loadavg=list(os.getloadavg()), cpus=os.cpu_count())
    with open("/proc/meminfo") as fh:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in fh}
    out.update(mem_total_mib=mem["MemTotal"] // 1024, mem_available_mib=mem["MemAvailable"] // 1024)
    hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    others = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()  # the fields after the command name
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        cpu = (int(f[11]) + int(f[12])) / hz / max(uptime - int(f[19]) / hz, 1e-3)
        if int(pid) != os.getpid() and cpu >= 0.05 and cmd:
            others.append(dict(pid=int(pid), nice=int(f[16]), cpu_pct=round(100 * cpu, 1),
                               rss_mib=int(f[21]) * page // 2**20, cmd=cmd[:160]))
    out["busy_processes"] = others
    return out


def run_all(args) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.results, exist_ok=True)
    lib = bench_dpo.find_tcmalloc() if args.alloc != "glibc" else None
    if args.alloc == "tcmalloc" and lib is None:
        sys.exit(f"--alloc tcmalloc: {bench_dpo.TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
    env = bench_dpo.worker_env(lib, HERE)
    rounds = args.rounds or 1
    n_batches = args.warmup + args.steps
    plan = rows(args.tasks.split(","), args.peers.split(","))
    t_start, load_start = time.perf_counter(), machine_load()
    common.log(f"[machine] load {load_start['loadavg']}, busy: "
               f"{[(p['pid'], p['nice'], p['cpu_pct']) for p in load_start['busy_processes']]}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workload = os.path.join(tmp, "workload.json")
        info = tw.build(workload, n_batches, config=args.config)
        common.log(f"[workload] {json.dumps(info['layouts'])}")
        peaks_path = os.path.join(args.results, f"peaks-{stamp}.json")
        peaks = bench_dpo.run_worker([os.path.join(HERE, "matmul_peak.py"), "--out", peaks_path], env,
                                     "peak", args.timeout, args.wait_quiet)
        if "error" in peaks:
            sys.exit(f"matmul_peak failed: {peaks['stderr_tail']}")
        timed = []
        for r in range(rounds):
            for fw, task, extra in plan[::-1 if r % 2 else 1]:  # odd rounds backwards
                cmd = [*SCRIPTS[fw], "--task", task, *extra, "--workload", workload, "--peaks", peaks_path,
                       "--warmup", str(args.warmup), "--steps", str(args.steps)]
                record = bench_dpo.run_retimed(cmd, env, "train", args.timeout, args.wait_quiet,
                                               args.retries, bench="train")
                record.update(round=r, cmd=" ".join(c for c in record["cmd"].split() if c != workload))
                timed.append(record)
                print(json.dumps(record, sort_keys=True), flush=True)
                common.log(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{rounds} "
                           f"{record.get('label', record.get('error')):32s} {record.get('s_per_step', 0):.2f} s/step "
                           f"{record.get('tok_s', 0):.0f} useful tok/s  rss {record.get('peak_rss_mib')}  "
                           f"others {record.get('others_cpu_frac')}  ({record['process_wall_s']} s)")
                if "error" in record:
                    common.log(record["stderr_tail"][-1500:])
    records = bench_dpo.median_rounds(timed)
    summary = dict(stamp=stamp, allocator="tcmalloc" if lib else "glibc", command=" ".join(sys.argv),
                   total_wall_s=round(time.perf_counter() - t_start, 1), rounds=rounds,
                   warmup=args.warmup, steps=args.steps, workload=info, settings=tw.settings(args.config),
                   machine_start=load_start, machine_end=machine_load(), comparisons=comparisons(records),
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


def comparisons(records: list[dict]) -> dict:
    """Per task and precision: packed vs bucketed pdpo_jax (useful tokens/s ratio: both train
    the same batches, so > 1 = packing is faster), and pdpo_jax's faster layout vs the
    hand-written PyTorch step of the same precision, where the run has it."""
    ok = [r for r in records if "tok_s" in r]
    find = lambda **kw: next((r for r in ok if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    out = {}
    for task in ("sft", "dpo"):
        for precision in ("bf16", "fp32"):
            packed = find(task=task, precision=precision, framework="pdpo_jax", layout="packed")
            bucketed = find(task=task, precision=precision, framework="pdpo_jax", layout="bucketed")
            torch_row = find(task=task, precision=precision, framework="torch")
            if not packed or not bucketed:
                continue
            best = max((packed, bucketed), key=lambda r: r["tok_s"])
            c = dict(packed_tok_s=packed["tok_s"], bucketed_tok_s=bucketed["tok_s"],
                     packed_over_bucketed=round(packed["tok_s"] / bucketed["tok_s"], 3),
                     packing_faster=bool(packed["tok_s"] > bucketed["tok_s"]),
                     packed_padding=packed["padding_share"], bucketed_padding=bucketed["padding_share"],
                     best_layout=best["layout"])
            if torch_row:
                c.update(torch=torch_row["label"], torch_tok_s=torch_row["tok_s"],
                         best_over_torch=round(best["tok_s"] / torch_row["tok_s"], 3))
            out[f"{task}-{precision}"] = c
    return out


COLUMNS = ["task", "row", "precision", "layout", "useful tok/s", "s/step", "steps (s)", "padding",
           "MFU", "MFU(N·useful)", "compile s", "peak RSS MiB", "others' CPU"]


def markdown(summary: dict, peaks: dict, records: list[dict]) -> str:
    g = lambda key: (peaks.get(key) or 0) / 1e9  # noqa: E731
    s, m0, m1 = summary["settings"], summary["machine_start"], summary["machine_end"]
    busy = "; ".join(f"pid {p['pid']} nice {p['nice']} {p['cpu_pct']:.0f}% CPU {p['rss_mib']} MiB `{p['cmd'][:90]}`"
                     for p in m0["busy_processes"]) or "none"
    lines = [
        (f"# Training-step benchmark {summary['stamp']}: SmolLM2-135M-Instruct on real persona-chat "
         f"batches (allocator: {summary['allocator']})"), "",
        (f"`{summary['command']}` — {summary['total_wall_s']:.0f} s; {summary['rounds']} round(s), one "
         f"process per row; {summary['warmup']} warm-up + {summary['steps']} timed steps per row, each "
         f"step its own batch, the same batches for every row. GEMM 2048³ peak (GFLOP/s): fp32 "
         f"{g('machine_fp32'):.0f}, bf16 {g('machine_bf16'):.0f}."), "",
        (f"Machine: {m0['cpus']} CPUs, {m0['mem_total_mib']} MiB; load average {m0['loadavg'][0]:.2f} / "
         f"{m0['loadavg'][1]:.2f} / {m0['loadavg'][2]:.2f} at the start, {m1['loadavg'][0]:.2f} / "
         f"{m1['loadavg'][1]:.2f} / {m1['loadavg'][2]:.2f} at the end; other busy processes at the start: "
         f"{busy}. `others' CPU` = the share of the machine's CPUs other processes used while the row "
         "was timed."), "",
        (f"Workload: `{s['config']}` — {s['template']} template, max_total_tokens {s['max_total_tokens']} "
         f"({s['truncation']}), max_response_tokens {s['max_response_tokens']}, buckets {s['buckets']}, "
         f"batch {s['sft_batch']} records (SFT) / {s['dpo_batch']} pairs (DPO; chosen = the record's "
         f"reply, rejected = another record's), pack length {s['sft_pack_length']} / "
         f"{s['dpo_pack_length']}; DPO β {s['beta']}, shared-prompt rows when bucketed "
         f"({s['share_prompt']}), the reference held in the step (frozen_forward_params) on every "
         "row, as the hand-written PyTorch step holds its own."), "",
        ("useful tok/s = the timed steps' useful tokens (prompt + response; DPO prompt + chosen + "
         "rejected, the prompt once) / their summed time; s/step = the mean. padding = 1 − real "
         "tokens / token slots the blocks run in the row's layout (for the PyTorch DPO rows the "
         "prompt is real in both the chosen and the rejected row). MFU = executed FLOPs (blocks on "
         "every token slot, the LM head where the row runs it) / s / GEMM peak of the precision; "
         "MFU(N·useful) credits 6·N (SFT) or 8·N (DPO) per useful token."), "",
        *tables.table_head(COLUMNS)]
    for r in records:
        if "tok_s" not in r:
            lines.append(tables.table_row(["", f"FAILED `{r.get('cmd')}` ({r.get('error')})"], len(COLUMNS)))
            continue
        lines.append(tables.table_row([
            r["task"], r["label"], r["precision"], r.get("layout", ""), f"{r['tok_s']:.0f}",
            f"{r['s_per_step']:.2f}", " ".join(f"{t:.1f}" for t in r["step_time"]["all_s"]),
            f"{r['padding_share']:.1%}", f"{r.get('mfu', 0):.1%}", f"{r.get('mfu_useful', 0):.1%}",
            "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
            f"{r['others_cpu_frac']:.0%}"]))
    lines += ["", ("Packing vs padded buckets (pdpo_jax, same batches; ratio > 1: packing faster), and "
                   "pdpo_jax's faster layout vs the hand-written PyTorch step:"), "",
              *tables.table_head(["task", "precision", "packed tok/s", "bucketed tok/s", "packed / bucketed",
                                  "padding packed / bucketed", "PyTorch tok/s", "best pdpo_jax / PyTorch"])]
    for key, c in summary["comparisons"].items():
        task, precision = key.split("-")
        lines.append(tables.table_row([
            task, precision, f"{c['packed_tok_s']:.0f}", f"{c['bucketed_tok_s']:.0f}",
            f"**{c['packed_over_bucketed']:.2f}×**", f"{c['packed_padding']:.1%} / {c['bucketed_padding']:.1%}",
            f"{c['torch_tok_s']:.0f}" if "torch_tok_s" in c else "–",
            f"{c['best_over_torch']:.2f}× ({c['best_layout']})" if "best_over_torch" in c else "–"]))
    lines += ["", ("Padding share of each layout over every batch of the plan (warm-up included; real = "
                   "tokens in the rows; useful = prompt + response, DPO prompt once):"), "",
              *tables.table_head(["task", "layout", "token slots", "real", "useful", "padding", "non-useful"])]
    for task, lay in summary["workload"]["layouts"].items():
        for name, v in lay.items():
            lines.append(tables.table_row([task, name, v["slots"], v["real"], v["useful"],
                                           f"{v['padding_share']:.1%}", f"{v['non_useful_share']:.1%}"]))
    lines += ["", common.noise_line(summary["noise"], "rows"), ""]
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
    ap.add_argument("--peers", default="torch-bf16",
                    help="PyTorch rows, comma-separated: torch-bf16, torch-fp32, trl-bf16, trl-fp32")
    ap.add_argument("--config", default=tw.CONFIG, help="the config whose data settings, batch sizes "
                    "and optimizers the workload and steps follow")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every row (default 1)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, SFT only")
    ap.add_argument("--alloc", default="auto", choices=["auto", "tcmalloc", "glibc"])
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each worker, wait up to S s for other processes to use < 10%% CPU")
    ap.add_argument("--retries", type=int, default=1,
                    help="re-time a row while other processes used > 10%% of the CPUs (0 on a machine "
                    "a long job shares: every row would run twice)")
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
                 "make smollm2 builds it)")
    if args.quick:
        args.warmup, args.steps, args.tasks = 1, 3, "sft"
    run_all(args)


if __name__ == "__main__":
    main()
