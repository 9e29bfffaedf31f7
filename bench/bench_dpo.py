"""DPO step throughput and MFU: pdpo_jax vs a hand-written PyTorch step vs trl's DPOTrainer.

    .venv/bin/python bench/bench_dpo.py --all [--tcmalloc] [--quick] [--rounds R]  # everything (~25 min)
    .venv/bin/python bench/bench_dpo.py jax --precision bf16 --window 32  # one pdpo_jax worker

`--all` runs every record in its own subprocess (torch's OpenMP pool and XLA's thread pool
never compete, and peak RSS is per record), in this order: the GEMM peak (matmul_peak.py),
the anchor-shape rows (pdpo_jax × {fp32, bf16} × {window 32, no window}, and with
dpo.share_prompt (the prompt run once per pair), hand-written torch, trl; in R rounds, each
row reporting its median round), SmolLM2-135M-size rows, then a sequence-length and a batch
sweep of pdpo_jax. Each
worker prints one JSON line on stdout; `--all` echoes them, then writes
bench/results/dpo-<stamp>.json (records + summary + target ratios) and dpo-<stamp>.md.

The pdpo_jax worker times the project's own step: `make_dpo_step` (policy + frozen reference
in one compiled step, AdamW from `make_optimizer`) jitted by `jit_dpo_step`, on batches from
`shard_batch`. Compile time (`lower().compile()`) is reported apart from the steady state.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from pdpo_jax import tables  # noqa: E402  (no jax import)
from pdpo_jax.allocator import TCMALLOC, find_tcmalloc  # noqa: E402,F401  (light: ctypes only)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------
# pdpo_jax worker


def model_config(name: str, precision: str, seq_len: int, unroll: bool = True):
    from pdpo_jax.models import ModelConfig
    m = common.MODELS[name]
    return ModelConfig(
        arch="llama", vocab_size=m["vocab_size"], d_model=m["hidden_size"],
        num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
        num_kv_heads=m["num_key_value_heads"], head_dim=m["head_dim"], mlp_dim=m["intermediate_size"],
        norm_eps=m["rms_norm_eps"], max_positions=seq_len, rope_theta=m["rope_theta"],
        tie_embeddings=m["tie_word_embeddings"],
        dtype="bfloat16" if precision == "bf16" else "float32", param_dtype="float32",
        unroll_layers=unroll)


def jax_batch(seed: int, vocab: int, pairs: int, seq_len: int) -> dict:
    """[1, pairs, seq_len] leaves (one micro-batch) in the layout of pdpo_jax.train.steps."""
    import numpy as np
    prompt, chosen, rejected = common.preference_ids(seed, vocab, pairs, seq_len)
    out = {}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        tokens = np.concatenate([prompt, response], axis=1).astype(np.int32)
        loss = np.zeros(tokens.shape, bool)
        loss[:, -common.RESPONSE:] = True
        fields = {"tokens": tokens, "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape),
                  "attention_mask": np.ones(tokens.shape, bool), "loss_mask": loss}
        out.update({f"{side}_{k}": np.ascontiguousarray(v)[None] for k, v in fields.items()})
    return out


def source_of(module) -> dict:
    """Where the measured pdpo_jax came from: its folder and git commit (+ uncommitted changes)."""
    folder = os.path.dirname(os.path.abspath(next(iter(module.__path__))))
    git = lambda *a: subprocess.run(["git", "-C", folder, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(pdpo_src=folder, pdpo_commit=git("rev-parse", "--short", "HEAD"),
                pdpo_dirty=bool(git("status", "--porcelain", "--", "pdpo_jax")))


def run_jax(args) -> dict:
    import jax
    import pdpo_jax
    from flax import nnx

    from pdpo_jax.allocator import release_free_memory, synchronous_cpu_dispatch
    from pdpo_jax.config import OptimizerConfig
    from pdpo_jax.models.layers import frozen_forward_params
    from pdpo_jax.sharding import make_mesh
    from pdpo_jax.train.optim import make_optimizer
    from pdpo_jax.train.state import create_state, init_params, jit_dpo_step, shard_batch
    from pdpo_jax.train.steps import DpoObjective, make_dpo_step

    synchronous_cpu_dispatch()  # as `python -m pdpo_jax.train` runs; before the CPU client exists
    cfg = model_config(args.model, args.precision, args.seq_len, unroll=args.layers == "unrolled")
    mesh = make_mesh()
    graphdef, params = init_params(cfg, mesh, seed=0)
    # the reference as the DPO stage holds it: own buffers (the policy state is donated), its
    # matrices in the compute dtype
    ref_params = frozen_forward_params(nnx.merge(graphdef, params))
    tx, lr = make_optimizer(OptimizerConfig(lr=common.LR, schedule="constant", warmup_ratio=0.0),
                            args.warmup + args.steps)
    state, state_sh = create_state(params, tx, mesh)
    step = make_dpo_step(graphdef, tx, lr, DpoObjective(beta=common.BETA), window=args.window,
                         chunk=args.chunk, share_prompt=args.share_prompt)
    jitted = jit_dpo_step(step, state_sh, mesh)
    batches = [shard_batch(jax_batch(seed, cfg.vocab_size, args.pairs, args.seq_len), mesh)
               for seed in range(2)]

    t0 = time.perf_counter()
    compiled = jitted.lower(state, ref_params, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    release_fn = release_free_memory()  # as the training loop does once its step is compiled
    times, first_s, metrics = [], 0.0, None
    common.reset_peak_rss()
    for i in range(args.warmup):
        t0 = time.perf_counter()
        state, metrics = compiled(state, ref_params, batches[i % 2])
        jax.block_until_ready((state, metrics))
        first_s = first_s or time.perf_counter() - t0
    with common.Meter() as meter:
        for i in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, ref_params, batches[i % 2])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not bool(metrics["finite"]):
        raise RuntimeError(f"non-finite DPO step: loss {loss}")
    label = f"pdpo_jax-{args.precision}-" + ("full" if args.window is None else f"win{args.window}")
    label += ("" if args.layers == "unrolled" else "-scan") + ("-shared" if args.share_prompt else "")
    record = dict(bench="dpo", framework="pdpo_jax", label=label, model=args.model,
                  precision=args.precision, window=args.window, chunk=args.chunk, pairs=args.pairs,
                  share_prompt=args.share_prompt, release_fn=release_fn,
                  last_layer_selected=True,  # hidden_states(select_BQ=) in the log-probs
                  seq_len=args.seq_len, compile_s=round(compile_s, 2), final_loss=loss,
                  jax_version=jax.__version__, **source_of(pdpo_jax), **meter.result)
    return common.finish(record, times, first_s, common.load_peaks(args.peaks))


# ---------------------------------------------------------------------------------------------
# --all: every record in its own subprocess, then the summary and the table

ANCHOR_ROWS = [  # (script, args): interleaved by framework so slow drifts hit all of them
    ("jax", ["--precision", "fp32", "--window", "32"]),
    ("torch", ["--precision", "fp32", "--window", "none"]),
    ("trl", []),
    ("jax", ["--precision", "bf16", "--window", "32"]),
    ("torch", ["--precision", "bf16", "--window", "none"]),
    ("trl", ["--defaults"]),
    ("jax", ["--precision", "fp32", "--window", "none"]),
    ("torch", ["--precision", "fp32", "--window", "32"]),
    ("jax", ["--precision", "bf16", "--window", "none"]),
    ("torch", ["--precision", "bf16", "--window", "32"]),
    ("jax", ["--precision", "fp32", "--window", "32", "--share-prompt"]),
    ("jax", ["--precision", "bf16", "--window", "32", "--share-prompt"]),
]
SMOL = ["--model", "smollm2-135m", "--pairs", "2", "--warmup", "1", "--steps", "5"]
SMOLLM_ROWS = [
    ("jax", SMOL + ["--precision", "fp32", "--window", "32"]),
    ("torch", SMOL + ["--precision", "fp32", "--window", "none"]),
    ("jax", SMOL + ["--precision", "bf16", "--window", "32"]),
    ("torch", SMOL + ["--precision", "bf16", "--window", "none"]),
    ("torch", SMOL + ["--precision", "bf16", "--window", "32"]),
    ("jax", SMOL + ["--precision", "bf16", "--window", "32", "--share-prompt"]),
]
SWEEP = ["--window", "32", "--warmup", "1", "--steps", "5"]
SWEEP_ROWS = ([("jax", SWEEP + ["--seq-len", str(t)]) for t in (256, 512, 1024)]
              + [("jax", SWEEP + ["--pairs", str(p)]) for p in (4, 16, 32)]
              + [("jax", SWEEP + ["--layers", "scan"]), ("jax", SWEEP + ["--layers", "scan", "--seq-len", "1024"]),
                 ("jax", SMOL + ["--precision", "fp32", "--window", "32", "--layers", "scan"])])
GROUPS = {"anchor": ANCHOR_ROWS, "smollm": SMOLLM_ROWS, "sweep": SWEEP_ROWS}
SCRIPTS = {"jax": [os.path.abspath(__file__), "jax"], "torch": [os.path.join(HERE, "torch_dpo.py")],
           "trl": [os.path.join(HERE, "trl_dpo.py")]}


NOISY = 0.1  # others_cpu_frac above which a row counts as contaminated


def wait_quiet(max_wait: float, threshold: float = NOISY) -> float:
    """Waits (at most max_wait s) until the other processes use < threshold of the CPUs over a
    2 s sample; returns the seconds waited. The machine is shared: this keeps a worker from
    starting in the middle of someone else's burst."""
    t0 = time.perf_counter()
    while True:
        with common.Meter() as meter:
            time.sleep(2.0)
        waited = time.perf_counter() - t0
        if meter.result["others_cpu_frac"] < threshold or waited >= max_wait:
            return round(waited, 1)


def worker_env(preload: str | None, *paths: str) -> dict:
    """The environment of every worker: the repo (and `paths`) importable, the allocator
    `preload` (a library path, or None for glibc malloc) and nothing else preloaded."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=os.pathsep.join(
        [REPO, *paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def run_worker(cmd: list[str], env: dict, group: str, timeout: float, quiet: float = 0.0,
               bench: str = "dpo") -> dict:
    waited = wait_quiet(quiet) if quiet > 0 else 0.0
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        rc, out, err = "timeout", text(e.stdout), text(e.stderr)
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    if rc == 0 and lines:
        record = json.loads(lines[-1])
    else:
        record = dict(bench=bench, error=f"rc={rc}", stderr_tail=(err or "")[-2000:])
    shown = " ".join(os.path.relpath(c, REPO) if c.startswith("/") else c for c in cmd)
    record.update(group=group, cmd=shown, waited_for_quiet_s=waited,
                  process_wall_s=round(time.perf_counter() - t0, 1))
    return record


def run_retimed(cmd: list[str], env: dict, group: str, timeout: float, quiet: float,
                retries: int, kept=lambda r: {"step_ms": r.get("step_ms")}, bench: str = "dpo") -> dict:
    """`run_worker`, run again (after waiting up to 60 s for quiet) while other processes took
    more than NOISY of the CPUs, at most `retries` times; the noisy attempts stay in the record
    (`kept(record)` of each, plus its noise)."""
    record = run_worker(cmd, env, group, timeout, quiet, bench)
    for _ in range(retries):  # someone else's burst: wait for quiet, time it again
        if record.get("others_cpu_frac", 0) <= NOISY:
            break
        common.log(f"  {record.get('label', cmd[-1])}: others used {record['others_cpu_frac']:.0%} "
                   "of the CPUs; re-timing")
        again = run_worker(cmd, env, group, timeout, max(quiet, 60), bench)
        again["noisy_attempts"] = record.get("noisy_attempts", []) + [
            {k: record.get(k) for k in ("others_cpu_frac", "load1_start")} | kept(record)]
        record = again
    return record


def run_all(args) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.results, exist_ok=True)
    lib = find_tcmalloc() if args.tcmalloc else None
    if args.tcmalloc and lib is None:
        sys.exit(f"--tcmalloc: {TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
    env = worker_env(lib)
    groups = ["anchor"] if args.quick else [g for g in args.groups.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        sys.exit(f"unknown --groups {sorted(unknown)}; choose from {sorted(GROUPS)}")
    rounds = args.rounds or (1 if args.quick else 5)
    plan = []  # (group, script, extra args, variant, env, round)
    for group in groups:
        for r in range(rounds if group == "anchor" else 1):
            for script, extra in GROUPS[group][::-1 if r % 2 else 1]:  # odd rounds backwards
                extra = list(extra) + (["--warmup", "1", "--steps", "5"] if args.quick else [])
                plan.append((group, script, extra, None, env, r))
                if args.proposed and script == "jax" and group != "sweep":
                    alt = dict(env, PYTHONPATH=os.pathsep.join([os.path.abspath(args.proposed), env["PYTHONPATH"]]))
                    plan.append((group, script, extra, "proposed", alt, r))
    t_start = time.perf_counter()
    peaks_path = os.path.join(args.results, f"peaks-{stamp}.json")
    peaks = run_worker([os.path.join(HERE, "matmul_peak.py"), "--out", peaks_path], env, "peak",
                       args.timeout, args.wait_quiet)
    print(json.dumps(peaks, sort_keys=True), flush=True)
    if "error" in peaks:
        sys.exit(f"matmul_peak failed: {peaks['stderr_tail']}")
    timed = []
    for group, script, extra, variant, row_env, r in plan:
        cmd = [*SCRIPTS[script], *extra, "--peaks", peaks_path]
        record = run_retimed(cmd, row_env, group, args.timeout, args.wait_quiet, args.retries)
        record["round"] = r
        if variant and "label" in record:
            record.update(variant=variant, label=record["label"] + "+" + variant)
        timed.append(record)
        print(json.dumps(record, sort_keys=True), flush=True)
        common.log(f"[{time.strftime('%H:%M:%S')}] {group:7s} {record.get('label', record.get('error')):28s} "
                   f"{record.get('model', '')} P={record.get('pairs')} T={record.get('seq_len')}: "
                   f"{record.get('step_ms')} ms/step  load {record.get('load1_start')} "
                   f"others {record.get('others_cpu_frac')}  ({record['process_wall_s']} s)")
    records = median_rounds(timed)
    summary = dict(stamp=stamp, allocator="tcmalloc" if args.tcmalloc else "glibc",
                   command=" ".join(sys.argv), total_wall_s=round(time.perf_counter() - t_start, 1),
                   anchor_rounds=rounds, targets=targets(records, None))
    if any(r.get("share_prompt") for r in records):  # else the same table twice
        summary["targets_unshared"] = targets(records, None, shared=False)
    if args.proposed:
        summary["targets_proposed"] = targets(records, "proposed")
        summary["proposed_src"] = os.path.abspath(args.proposed)
    summary["noise"] = noise(timed)
    json_path = os.path.join(args.results, f"dpo-{stamp}.json")
    with open(json_path, "w") as fh:
        json.dump(dict(summary=summary, peaks=peaks, records=records, round_records=timed), fh, indent=1,
                  sort_keys=True)
    table = markdown(summary, peaks, records)
    with open(os.path.join(args.results, f"dpo-{stamp}.md"), "w") as fh:
        fh.write(table)
    print(json.dumps({"summary": summary}, sort_keys=True), flush=True)
    print(table)
    common.log(f"wrote {json_path} and .md ({summary['total_wall_s']} s)")


def median_rounds(timed: list[dict]) -> list[dict]:
    """One record per row (same group, command and variant), in the order rows first ran: the
    row's median round (for an even count the faster of the middle two), with every round's
    ms/step in `step_ms_rounds`. The machine's speed drifts over tens of seconds (one process
    timing 160 anchor steps: 8-step medians from 272 to 340 ms), so a single process per row can
    time one framework in a slow spell and its peer in a fast one; the median of interleaved
    processes keeps that out of the ratios, alike for every framework. A row whose every round
    failed keeps the first failure."""
    rows: dict[tuple, list[dict]] = {}
    for record in timed:
        rows.setdefault((record["group"], record["cmd"], record.get("variant")), []).append(record)
    out = []
    for runs in rows.values():
        ok = sorted((r for r in runs if "step_ms" in r), key=lambda r: r["step_ms"])
        if not ok:
            out.append(runs[0])
            continue
        out.append(dict(ok[(len(ok) - 1) // 2], step_ms_rounds=[r.get("step_ms") for r in runs],
                        rounds=len(runs), failed_rounds=len(runs) - len(ok)))
    return out


def _fastest(records, **match):
    rows = [r for r in records if "step_ms" in r and all(r.get(k) == v for k, v in match.items())]
    return min(rows, key=lambda r: r["step_ms"]) if rows else None


def _mib(value) -> str:
    """A MiB table cell; '–' where a worker could not measure it (no /proc/self/clear_refs)."""
    return "–" if value is None else f"{value:.0f}"


def targets(records, variant, shared: bool = True) -> dict:
    """The issue's targets on the anchor shapes: pdpo_jax rows of `variant` (None = the code as
    it is; shared=False leaves out the share_prompt rows) against the torch and trl rows of
    the same run (same allocator)."""
    anchor = [r for r in records if r.get("group") == "anchor" and "step_ms" in r]
    ours = [r for r in anchor if r["framework"] == "pdpo_jax" and r.get("variant") == variant
            and (shared or not r.get("share_prompt"))]
    peers = [r for r in anchor if r["framework"] in ("torch", "trl")]
    best, best32 = _fastest(ours), _fastest(ours, precision="fp32")
    out = {}

    def ratio(name, a, b, target):
        if a and b:
            value = b["step_ms"] / a["step_ms"]
            out[name] = dict(ours=a["label"], peer=b["label"], ours_ms=a["step_ms"], peer_ms=b["step_ms"],
                             ratio=round(value, 3), target=target, met=bool(value >= target))
    ratio("best vs fastest PyTorch row (hand-written or trl)", best, _fastest(peers), 1.2)
    ratio("best vs fastest PyTorch row as users write it (full vocab)", best,
          _fastest([r for r in peers if r["window"] is None]), 1.2)
    ratio("fp32 vs trl fp32", best32, _fastest(peers, label="trl-fp32"), 2.5)
    ratio("fp32 vs hand-written torch fp32", best32, _fastest(peers, label="torch-fp32-full"), 1.5)
    if best32 and "mfu" in best32:
        out["fp32 MFU vs machine fp32 GEMM peak"] = dict(
            ours=best32["label"], mfu=round(best32["mfu"], 3), mfu_8N=round(best32["mfu_model_flops"], 3),
            target=0.55, met=bool(best32["mfu"] >= 0.55))
    hand = [r for r in peers if r["framework"] == "torch"]
    if best and hand:
        same = _fastest(hand, precision=best["precision"], window=None) or hand[0]
        for key, name in (("peak_rss_mib", "peak RSS vs hand-written torch (whole process)"),
                          ("steps_peak_rss_mib", "peak RSS vs hand-written torch (training steps)")):
            if key in best and all(key in r for r in hand):
                out[name] = dict(ours=best["label"], ours_mib=best[key], peer=same["label"],
                                 peer_mib=same[key], torch_min_mib=min(r[key] for r in hand),
                                 met=bool(best[key] <= same[key]))
    return out


def _row_name(r: dict) -> str:
    name = f"{r['label']}/{r['model']}/{r['pairs']}x{r['seq_len']}"
    return name + (f" round {r['round'] + 1}" if r.get("round") else "")


def noise(records, name=_row_name) -> dict:
    """The run's worst load and other processes' CPU share while timing, the records above
    NOISY (by `name`), and the failed commands."""
    timed = [r for r in records if "others_cpu_frac" in r]
    return dict(max_load1=max((r["load1_start"] for r in timed), default=None),
                max_others_cpu_frac=max((r["others_cpu_frac"] for r in timed), default=None),
                contaminated=[name(r) for r in timed if r["others_cpu_frac"] > NOISY],
                failed=[r["cmd"] for r in records if "error" in r])


ROW_COLUMNS = ["group", "row", "model", "pairs×T", "ms/step", "rounds ms", "steps/s", "tokens/s",
               "GFLOP exec", "MFU", "MFU(8N)", "compile s", "1st step s", "peak RSS MiB",
               "steps RSS MiB", "load1", "others", "steal"]


def markdown(summary, peaks, records) -> str:
    g = lambda key: (peaks.get(key) or 0) / 1e9  # noqa: E731
    lines = [
        f"# DPO step benchmark {summary['stamp']} (allocator: {summary['allocator']})", "",
        f"`{summary['command']}` — {summary['total_wall_s']:.0f} s. GEMM 2048³ peak (GFLOP/s, best call): "
        f"fp32 jax {g('jax_fp32'):.0f}, torch/MKL {g('torch_fp32'):.0f}, torch/oneDNN {g('torch_onednn_fp32'):.0f} "
        f"→ machine {g('machine_fp32'):.0f}; bf16 jax {g('jax_bf16'):.0f}, torch {g('torch_bf16'):.0f} → "
        f"machine {g('machine_bf16'):.0f}.", "",
        f"ms/step = the median step of the row's median round; anchor rows ran in {summary.get('anchor_rounds', 1)} "
        "rounds of separate processes, odd rounds in reverse order (`rounds ms`: each round's median step).", "",
        "tokens/step = 2 × pairs × T (chosen + rejected; policy and reference read the same tokens), "
        "model FLOPs = 8·N·tokens. MFU = executed FLOPs / median step / machine peak of the row's "
        "precision (win rows run the LM head on the 32 response positions only, as the anchors' "
        "lmhead_resp rows; -shared rows (dpo.share_prompt) run the blocks on prompt + 2 responses "
        "per pair and are credited with those FLOPs); MFU(8N) credits 8·N·tokens to every row. `others` = share of the CPUs "
        "other processes used while the row was timed.", "",
        *tables.table_head(ROW_COLUMNS)]
    for r in records:
        if "step_ms" not in r:
            lines.append(tables.table_row([r["group"], f"FAILED `{r['cmd']}` ({r.get('error')})"], len(ROW_COLUMNS)))
            continue
        lines.append(
            f"| {r['group']} | {r['label']} | {r['model']} | {r['pairs']}×{r['seq_len']} | {r['step_ms']:.0f} | "
            f"{' / '.join('–' if m is None else f'{m:.0f}' for m in r.get('step_ms_rounds', [r['step_ms']]))} | "
            f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['executed_flops_per_step'] / 1e9:.1f} | "
            f"{r.get('mfu', 0):.1%} | {r.get('mfu_model_flops', 0):.1%} | "
            f"{'' if r.get('compile_s') is None else r['compile_s']} | {r['first_step_s']} | "
            f"{r['peak_rss_mib']:.0f} | {_mib(r.get('steps_peak_rss_mib'))} | {r['load1_start']} | {r['others_cpu_frac']:.0%} | {r['cpu_steal_frac']:.1%} |")
    for key, title in (("targets", "pdpo_jax, any configuration"),
                       ("targets_unshared", "pdpo_jax without dpo.share_prompt: every row runs "
                        "prompt + response, as the PyTorch peers do"),
                       ("targets_proposed", "with the proposed change")):
        if key not in summary:
            continue
        lines += ["", f"Targets ({title}; anchor shapes, this run):", "",
                  *tables.table_head(["target", "ours", "peer", "value", "target", "met"])]
        for name, t in summary[key].items():
            met = "yes" if t["met"] else "**no**"
            if "ratio" in t:
                lines.append(f"| {name} | {t['ours']} ({t['ours_ms']:.0f} ms) | {t['peer']} ({t['peer_ms']:.0f} ms) "
                             f"| {t['ratio']:.2f}× | ≥ {t['target']}× | {met} |")
            elif "mfu" in t:
                lines.append(f"| {name} | {t['ours']} | | {t['mfu']:.1%} (8N: {t['mfu_8N']:.1%}) | ≥ 55% | {met} |")
            else:
                lines.append(f"| {name} | {t['ours']} ({t['ours_mib']:.0f} MiB) | {t['peer']} "
                             f"({t['peer_mib']:.0f} MiB; torch min {t['torch_min_mib']:.0f}) | | ≤ | {met} |")
    lines += ["", common.noise_line(summary["noise"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def worker_args(ap: argparse.ArgumentParser) -> None:
    common.step_args(ap, window=32)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--share-prompt", action="store_true",
                    help="dpo.share_prompt: one row per pair holding the prompt once")
    ap.add_argument("--layers", choices=["unrolled", "scan"], default="unrolled",
                    help="pdpo_jax layer loop (model.unroll_layers): unrolled is faster on CPU, "
                         "scan holds less memory")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="run every record, write bench/results/")
    ap.add_argument("--tcmalloc", action="store_true",
                    help="LD_PRELOAD libtcmalloc_minimal.so.4 into every worker (all frameworks alike)")
    ap.add_argument("--groups", default="anchor,smollm,sweep", help=f"subset of {sorted(GROUPS)}")
    ap.add_argument("--quick", action="store_true", help="anchor rows only, 1 warm-up + 5 steps")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each worker, wait up to S s for other processes to use < 10%% CPU")
    ap.add_argument("--rounds", type=int, default=None, metavar="R",
                    help="run the anchor rows R times in separate processes, odd rounds in reverse "
                         "order, and report each row's median round (default 5; 1 with --quick)")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-time a row up to N times when other processes took > 10%% of the CPUs")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--proposed", metavar="SRC", default=None,
                    help="also run every anchor/smollm pdpo_jax row with pdpo_jax imported from SRC "
                         "(a checkout carrying a proposed change), labelled +proposed")
    sub = ap.add_subparsers(dest="cmd")
    worker_args(sub.add_parser("jax", help="one pdpo_jax record"))
    args = ap.parse_args()
    if args.all:
        run_all(args)
    elif args.cmd == "jax":
        record = run_jax(args)
        common.log(f"[{record['label']}] {record['model']} pairs={args.pairs} T={args.seq_len}: "
                   f"{record['step_ms']} ms/step, {record['tokens_per_s']:.0f} tok/s, "
                   f"compile {record['compile_s']} s, rss {record['peak_rss_mib']} MiB")
        common.emit(record)
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
