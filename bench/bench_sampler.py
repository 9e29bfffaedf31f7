"""New tokens/s of our jitted KV-cache sampler vs `transformers.generate` (torch, CPU), in fp32
and in bf16, how far each decode step is from the machine's memory-bandwidth bound, and the
roofline: the largest speedup over HF that this machine allows any framework.

    .venv/bin/python bench/bench_sampler.py [--model all|anchor|smollm2-135m] [--quick]
        [--dtypes float32,bfloat16] [--rounds R] [--reps N] [--alloc auto|tcmalloc|glibc]
        [--wait-quiet S] [--retries N]

Models: `anchor` = the Llama of ../shared/anchors/common.py (d=256, ff=688, 4 layers, 4 heads,
vocab 8000, untied), random weights (torch seed 0, built as in torch_dpo.py); `smollm2-135m` =
SmolLM2-135M-Instruct from the HF folder $PDPO_SMOLLM2_DIR or
~/.cache/pdpo-models/smollm2-135m-instruct (skipped, with a message, when absent). Both
frameworks load the same folder in the same precision and get the same random prompt ids
(numpy seed 1). Precisions (`--dtypes`): float32 = fp32 weights and compute on both sides
(ours: `from_pretrained(folder, stack_layers=False)`, the decode layout the negatives stage
loads, HF: `from_pretrained(dtype=torch.float32)`); bfloat16 = bf16 weights and compute, fp32
logits and sampling on both sides (ours: also `dtype=param_dtype="bfloat16"`, HF:
`from_pretrained(dtype=torch.bfloat16)`). The speedup is
taken at the same precision; "best" compares each framework's faster precision. Shapes: batch
16, prompt 96, exactly 32 new tokens (EOS off); greedy, and top-p
0.9 at temperature 1 (top_k=0 on the HF side: its default top_k=50 would apply too).

What is timed (each framework and precision in its own process; a round runs jax, hf per
precision):
- one call = `Sampler.sample` (prefill + decode loop + result to host) or `model.generate`;
  new tokens/s = 16 · 32 / median call time over `reps` calls after a first (compiling) call;
  compile s ≈ first call − median (jax).
- prefill = median of 5 calls of the prompt forward alone: ours `jit(SamplingLoop.prefill)`
  (fresh cache + 96-token forward + LM head on the last column), HF the model's forward with
  `use_cache=True, logits_to_keep=1` (what generate runs first).
- decode s/step = (median call − prefill) / (new_tokens − 1): both produce the first new token
  from the prefill logits and then run new_tokens − 1 one-token steps (our `lax.while_loop`
  body; HF's decode forwards). Sampling, host transfer and generate's set-up are charged to
  the steps.
- memory-bandwidth bound per decode step = bytes it must read / machine bandwidth, with
  bytes = w · (block weights + LM head) (w = 4 bytes in fp32, 2 in bf16; the tied SmolLM2 head
  is the embedding matrix, read once) + KV cache 2 · L · B · K · S · H · w. S: ours = P + new_tokens = 128 (the cache
  is allocated at full length and attention reads every slot, masked); HF = P + new_tokens/2
  = 112 (its DynamicCache grows, mean length over the decode steps). Bandwidth = best of
  jitted `x + 1` over a 512 MiB fp32 array (plain and donated), counting read + write bytes.
  ×bound = measured decode step / bound (1.0 = at the bound).
- roofline (with the GEMM peak of `matmul_peak.py`, best of jax and torch, per precision): the
  prefill's FLOPs at the peak, then each decode step at max(its FLOPs / peak, its bytes /
  bandwidth) over a cache of P + new_tokens/2 slots (a growing cache, mean). FLOPs = 2 per
  multiply-add of every matmul that must run (`prefill_flops`, `decode_flops`). The ceiling =
  HF's median call / the roofline call: no framework can beat HF by more on this machine. (At
  batch 16 both models' decode steps are compute-bound here, in both precisions: 16 rows share
  each weight read, so the memory bound alone understates the floor.)

The issue's reference (anchor, fp32, when ../shared/anchors is there; $PDPO_ANCHORS_DIR
elsewhere): its minimal JAX decode loop, `jax_reference.make_generate` (greedy and its
sort-free top-p), on the same weights and prompts, in the same rounds, timed as ours. The issue
set its targets from that loop's speedup over HF on the anchors' machine; the report gives its
speedup here, ours over it, and whether its greedy tokens equal HF's and ours.

Noise: each worker records load, CPU steal and `others_cpu_frac` (share of the CPUs other
processes used while it was timing; common.Meter); a worker above 10 % is re-timed up to
--retries times after waiting for a quiet machine. All workers get the same allocator
(tcmalloc LD_PRELOADed when installed, `--alloc auto`), recorded in the JSON.

Prints progress on stderr and ONE json line (the summary) on stdout; writes
bench/results/sampler-<stamp>.json (summary + every worker record) and sampler-<stamp>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (offline env vars before transformers)
from pdpo_jax import tables  # noqa: E402  (no jax import)
import bench_dpo  # noqa: E402  (worker_env, run_retimed, noise, find_tcmalloc, source_of; light imports)

BATCH, PROMPT, NEW, TOP_P = 16, 96, 32, 0.9
MODES = ("greedy", "top_p")
DTYPES = ("float32", "bfloat16")
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
TARGETS = {"greedy": 2.5, "top_p": 3.5}  # issue 5: our new tok/s ÷ HF generate's, same run
MODELS = ("anchor", "smollm2-135m")
# (rounds, reps) per model: a SmolLM2 generate call takes seconds on 2 cores, so fewer of them
DEFAULT_PLAN = {"anchor": (4, 7), "smollm2-135m": (2, 3)}
QUICK_PLAN = {"anchor": (1, 3), "smollm2-135m": (1, 2)}
PREFILL_REPS = 5
MEMBW_MIB = 512
# The issue's own minimal JAX decode loop (its "last anchor run"), timed beside ours on the anchor
# in fp32 when the folder is there; $PDPO_ANCHORS_DIR overrides the place.
ANCHORS_DIR = os.path.join(HERE, "..", "..", "shared", "anchors")


def anchors_dir() -> str | None:
    """The folder of ../shared/anchors/jax_reference.py, or None when it is not there."""
    folder = os.path.abspath(os.environ.get("PDPO_ANCHORS_DIR") or ANCHORS_DIR)
    return folder if os.path.exists(os.path.join(folder, "jax_reference.py")) else None


def smollm2_dir() -> str:
    return os.path.expanduser(os.environ.get("PDPO_SMOLLM2_DIR")
                              or "~/.cache/pdpo-models/smollm2-135m-instruct")


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def decode_step_s(call_s: float, prefill_s: float) -> float:
    """Seconds per one-token decode step: the first new token comes from the prefill."""
    return (call_s - prefill_s) / (NEW - 1)


def _attention_macs(model: str) -> int:
    """Multiply-adds of attention per (query, key) pair: the score and the P·V product, every head."""
    m = common.MODELS[model]
    return 2 * m["num_attention_heads"] * m["head_dim"]


def decode_flops(model: str, kv_len: int) -> float:
    """FLOPs one decode step of the batch must execute (2 per multiply-add): every layer's
    matmuls (`common.param_counts`, norms left out) and the LM head for the B new tokens, and
    attention over kv_len keys."""
    n, layers = common.param_counts(model), common.MODELS[model]["num_hidden_layers"]
    per_layer = n["layer_kv"] + n["layer_queries"] + _attention_macs(model) * kv_len
    per_token = layers * per_layer + n["lm_head"]
    return 2.0 * BATCH * per_token


def prefill_flops(model: str) -> float:
    """FLOPs the prefill of the batch must execute: k and v of the P prompt tokens in every
    layer; q, o, the MLP and causal attention (query t over t + 1 keys) for every token but in
    the last layer, which needs them at the last column only (all the first new token needs);
    and the LM head there."""
    n, layers, P = common.param_counts(model), common.MODELS[model]["num_hidden_layers"], PROMPT
    queries = (layers - 1) * P + 1
    keys = (layers - 1) * P * (P + 1) // 2 + P  # (query, key) pairs attended
    return 2.0 * BATCH * (layers * P * n["layer_kv"] + queries * n["layer_queries"]
                          + keys * _attention_macs(model) + n["lm_head"])


def roofline(model: str, dtype: str, peak: float, bandwidth: float) -> dict:
    """The fastest call this machine allows, whatever the framework: the prefill's FLOPs at the
    GEMM peak, then NEW - 1 decode steps each at max(FLOPs / peak, bytes / bandwidth), over a
    cache that grows (P + NEW/2 keys on average). peak: FLOP/s, bandwidth: GB/s."""
    kv_len = PROMPT + NEW // 2
    compute_s = decode_flops(model, kv_len) / peak
    memory_s = step_bytes(model, kv_len, dtype)["total"] / (bandwidth * 1e9)
    step_s = max(compute_s, memory_s)
    prefill_s = prefill_flops(model) / peak
    return dict(prefill_s=prefill_s, step_compute_s=compute_s, step_memory_s=memory_s, step_s=step_s,
                call_s=prefill_s + (NEW - 1) * step_s)


def step_bytes(model: str, kv_len: int, dtype: str = "float32") -> dict:
    """Bytes one decode step of `model` must read at least: the block weights and the LM head
    once, and the K and V caches of kv_len slots, all in `dtype`."""
    m = common.MODELS[model]
    width = {"float32": 4, "bfloat16": 2}[dtype]
    weights = width * common.param_counts(model)["n_flops"]  # blocks (incl. norms) + LM head
    kv = 2 * m["num_hidden_layers"] * BATCH * m["num_key_value_heads"] * kv_len * m["head_dim"] * width
    return dict(weights=weights, kv=kv, total=weights + kv, kv_len=kv_len)


# ---------------------------------------------------------------------------------------------
# Workers: each prints one JSON line on stdout


def worker_build(folder: str) -> dict:
    """Saves the anchor Llama (random init, torch seed 0, as the DPO bench's torch rows) to folder."""
    from torch_dpo import build_model
    build_model("anchor", seed=0).save_pretrained(folder)
    return dict(folder=folder)


def worker_membw(mib: int = MEMBW_MIB, reps: int = 10) -> dict:
    """Memory bandwidth: best time of a jitted `x + 1` over `mib` MiB of fp32, plain (reads x,
    writes a new buffer) and with x donated (in place); bytes counted = read + write."""
    import jax
    import jax.numpy as jnp
    n = mib * 2**20 // 4
    out = dict(bench="membw", array_mib=mib, bytes_counted=2 * 4 * n, allocator=common.allocator())
    plain = jax.jit(lambda x: x + 1)
    x = jax.block_until_ready(jnp.ones(n, jnp.float32))
    jax.block_until_ready(plain(x))
    best = min(timed(lambda: jax.block_until_ready(plain(x)), reps))
    out["jax_add_gbs"] = round(2 * 4 * n / best / 1e9, 2)
    donated = jax.jit(lambda x: x + 1, donate_argnums=0)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        x = jax.block_until_ready(donated(x))
        times.append(time.perf_counter() - start)
    out["jax_add_donated_gbs"] = round(2 * 4 * n / min(times[1:]) / 1e9, 2)
    out["bandwidth_gbs"] = max(out["jax_add_gbs"], out["jax_add_donated_gbs"])
    out["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    return out


def worker_jax(folder: str, prompts: str, reps: int, dtype: str = "float32") -> dict:
    """Our `Sampler` on the folder's weights in `dtype`, loaded as the negatives stage loads
    them (in the decode layout: one copy of the weights; one sampler, the config per call)
    and run as it runs them (XLA:CPU programs inline, `synchronous_cpu_dispatch`): per mode a
    first call, then `reps` timed calls; then the prefill alone."""
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()  # as `python -m pdpo_jax.train` runs the negatives stage
    import jax
    import jax.numpy as jnp
    import numpy as np
    import pdpo_jax
    from pdpo_jax.models import from_pretrained
    from pdpo_jax.sampling import Sampler, SamplingConfig
    model = from_pretrained(folder, dtype=dtype, param_dtype=dtype, stack_layers=False)
    tokens = np.load(prompts).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    configs = {"greedy": SamplingConfig(NEW, greedy=True),
               "top_p": SamplingConfig(NEW, top_p=TOP_P, temperature=1.0)}
    out = dict(bench="sampler", framework="jax", dtype=dtype, unroll_layers=model.cfg.unroll_layers)
    sampler = Sampler(model, configs["greedy"])
    for mode, cfg in configs.items():
        start = time.perf_counter()
        first = sampler.sample(tokens, mask, cfg=cfg)
        first_s = time.perf_counter() - start
        assert (first.lengths == NEW).all()
        with common.Meter() as meter:
            times = timed(lambda: sampler.sample(tokens, mask, cfg=cfg), reps)
        s = common.summarize(times)
        out[mode] = dict(call=s, new_tokens_per_s=BATCH * NEW / s["median_s"], first_call_s=first_s,
                         compile_s_approx=max(0.0, first_s - s["median_s"]), **meter.result)
        if mode == "greedy":
            out[mode]["tokens"] = first.tokens.tolist()
        common.log(f"  [jax {dtype}] {mode}: first call {first_s:.2f} s, {s['median_s'] * 1e3:.1f} ms/call -> "
                   f"{out[mode]['new_tokens_per_s']:.0f} new tok/s (others {meter.result['others_cpu_frac']:.0%})")
    prefill = jax.jit(sampler.loop.prefill)
    args = (sampler.weights, jnp.asarray(tokens), jnp.asarray(mask))
    jax.block_until_ready(prefill(*args))
    out["prefill"] = common.summarize(timed(lambda: jax.block_until_ready(prefill(*args)), PREFILL_REPS))
    out["versions"] = dict(jax=jax.__version__, **bench_dpo.source_of(pdpo_jax))
    return out


def worker_hf(folder: str, prompts: str, reps: int, torch_threads: int | None,
              dtype: str = "float32") -> dict:
    """`transformers.generate` (KV cache) on the folder's weights in `dtype`: per mode a first
    call, then `reps` timed calls; then the prefill forward alone."""
    import numpy as np
    import torch
    import transformers
    if torch_threads:
        torch.set_num_threads(torch_threads)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    ids = torch.from_numpy(np.load(prompts))
    attn = torch.ones_like(ids)
    base = dict(max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    configs = {"greedy": transformers.GenerationConfig(do_sample=False, **base),
               "top_p": transformers.GenerationConfig(do_sample=True, top_p=TOP_P, top_k=0,
                                                      temperature=1.0, **base)}
    out = dict(bench="sampler", framework="hf", dtype=dtype,
               attn_implementation=model.config._attn_implementation)
    for mode, gc in configs.items():
        torch.manual_seed(0)

        def run():
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)
        start = time.perf_counter()
        first = run()
        first_s = time.perf_counter() - start
        assert first.shape == (BATCH, PROMPT + NEW)
        with common.Meter() as meter:
            times = timed(run, reps)
        s = common.summarize(times)
        out[mode] = dict(call=s, new_tokens_per_s=BATCH * NEW / s["median_s"], first_call_s=first_s,
                         **meter.result)
        if mode == "greedy":
            out[mode]["tokens"] = first[:, PROMPT:].tolist()
        common.log(f"  [hf {dtype}] {mode}: first call {first_s:.2f} s, {s['median_s'] * 1e3:.1f} ms/call -> "
                   f"{out[mode]['new_tokens_per_s']:.0f} new tok/s (others {meter.result['others_cpu_frac']:.0%})")

    def prefill():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=attn, use_cache=True, logits_to_keep=1)
    prefill()
    out["prefill"] = common.summarize(timed(prefill, PREFILL_REPS))
    out["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__,
                           torch_threads=torch.get_num_threads())
    return out


def _import_reference(folder: str):
    """../shared/anchors/jax_reference.py as a module. It imports its own `common`, a name this
    bench's common.py holds in sys.modules: ours is set aside while it loads, then put back."""
    import importlib
    ours = sys.modules.pop("common")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("jax_reference")
    finally:
        sys.path.remove(folder)
        sys.modules["common"] = ours


def worker_ref(folder: str, prompts: str, reps: int) -> dict:
    """The issue's minimal JAX decode loop (`jax_reference.make_generate`: fp32, prefill + a
    `fori_loop` of one-token steps, greedy and its sort-free top-p) on the folder's weights
    (copied from the HF model by its own `params_from_hf`) and the same prompts: per mode a
    first call, then `reps` timed calls; then its prefill alone (as its `run_decode` times it).
    It has no padding mask, one position for all rows and no stop handling, so it does less
    than our sampler; it is what the issue measured its targets against."""
    import jax
    import numpy as np
    import torch
    import transformers
    ref = _import_reference(anchors_dir())
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = ref.params_from_hf(hf)
    del hf
    prompt = jax.numpy.asarray(np.load(prompts).astype(np.int32))
    key = jax.random.PRNGKey(0)
    out = dict(bench="sampler", framework="ref", dtype="float32",
               source=os.path.join(anchors_dir(), "jax_reference.py"))
    for mode, ref_mode in (("greedy", "greedy"), ("top_p", "top_p_bisect")):
        generate = ref.make_generate(NEW, ref_mode)
        start = time.perf_counter()
        first = np.asarray(generate(params, prompt, key))
        first_s = time.perf_counter() - start
        with common.Meter() as meter:
            times = timed(lambda: jax.block_until_ready(generate(params, prompt, key)), reps)
        s = common.summarize(times)
        out[mode] = dict(call=s, new_tokens_per_s=BATCH * NEW / s["median_s"], first_call_s=first_s,
                         **meter.result)
        if mode == "greedy":
            out[mode]["tokens"] = first.tolist()
        common.log(f"  [ref] {mode}: first call {first_s:.2f} s, {s['median_s'] * 1e3:.1f} ms/call -> "
                   f"{out[mode]['new_tokens_per_s']:.0f} new tok/s (others {meter.result['others_cpu_frac']:.0%})")
    prefill = jax.jit(lambda p, x: ref.hidden_states(p, x, return_kv=True)[0][:, -1] @ p["lm_head"])
    jax.block_until_ready(prefill(params, prompt))
    out["prefill"] = common.summarize(timed(lambda: jax.block_until_ready(prefill(params, prompt)),
                                            PREFILL_REPS))
    out["versions"] = dict(jax=jax.__version__)
    return out


def finish_worker(record: dict) -> dict:
    """Decode step per mode, the worker's noise (worst mode) and the host facts."""
    if record.get("framework") in ("jax", "hf", "ref"):
        prefill = record["prefill"]["median_s"]
        for mode in MODES:
            record[mode]["decode_step_s"] = decode_step_s(record[mode]["call"]["median_s"], prefill)
        record["others_cpu_frac"] = max(record[m]["others_cpu_frac"] for m in MODES)
        record["load1_start"] = record[MODES[0]]["load1_start"]
    record.update(allocator=common.allocator(), peak_rss_mib=round(common.peak_rss_mib(), 1),
                  host=common.host())
    return record


# ---------------------------------------------------------------------------------------------
# The whole run


class Runner:
    """Runs workers in subprocesses with one environment (allocator, PYTHONPATH), waiting for a
    quiet machine and re-timing noisy workers as bench_dpo does."""

    def __init__(self, args):
        self.args = args
        lib = bench_dpo.find_tcmalloc() if args.alloc != "glibc" else None
        if args.alloc == "tcmalloc" and lib is None:
            sys.exit(f"--alloc tcmalloc: {bench_dpo.TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
        if lib is None and args.alloc == "auto":
            common.log(f"note: {bench_dpo.TCMALLOC} not installed -> glibc malloc")
        self.env = bench_dpo.worker_env(lib, HERE)
        self.allocator = "tcmalloc" if lib else "glibc"

    def worker(self, group: str, kind: str, *extra: str, retime: bool = True) -> dict:
        cmd = [os.path.abspath(__file__), "--worker", kind, *extra]
        if kind == "hf" and self.args.torch_threads:
            cmd += ["--torch-threads", str(self.args.torch_threads)]
        record = bench_dpo.run_retimed(
            cmd, self.env, group, self.args.timeout, self.args.wait_quiet,
            self.args.retries if retime else 0, bench="sampler",
            kept=lambda r: {f"{m}_new_tok_s": r[m]["new_tokens_per_s"] for m in MODES if m in r})
        if "error" in record:
            common.log(f"  [{kind}] FAILED ({record['error']}):\n{record['stderr_tail']}")
        elif kind in ("jax", "hf", "ref"):
            common.log(f"  [{kind}] " + ", ".join(
                f"{m} {record[m]['new_tokens_per_s']:.0f} new tok/s" for m in MODES)
                + f"; prefill {record['prefill']['median_s'] * 1e3:.0f} ms; others "
                f"{record['others_cpu_frac']:.0%}; {record['process_wall_s']} s")
        return record


def run_model(runner: Runner, model: str, rounds: int, reps: int, bandwidth: float | None,
              dtypes: tuple[str, ...] = DTYPES, peaks: dict | None = None) -> dict:
    """Prepares the weights and prompts of `model`, runs the rounds, and summarises them."""
    import numpy as np
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        if model == "anchor":
            folder = os.path.join(tmp, "anchor")
            built = runner.worker(model, "build", "--folder", folder, retime=False)
            if "error" in built:
                return dict(model=model, error="building the anchor checkpoint failed", records=[built])
        else:
            folder = smollm2_dir()
            if not os.path.exists(os.path.join(folder, "model.safetensors")):
                msg = (f"skipped: no SmolLM2-135M folder at {folder} (config.json + model.safetensors; "
                       "set PDPO_SMOLLM2_DIR)")
                common.log(f"[{model}] {msg}")
                return dict(model=model, skipped=msg)
            with open(os.path.join(folder, "config.json")) as fh:
                hf_cfg = json.load(fh)
            shape = {k: v for k, v in common.MODELS[model].items() if k in hf_cfg and hf_cfg[k] != v
                     and k not in ("rms_norm_eps",)}
            if shape:
                return dict(model=model, error=f"{folder} is not SmolLM2-135M-shaped: {shape}")
        prompts = os.path.join(tmp, "prompts.npy")
        vocab = common.MODELS[model]["vocab_size"]
        np.save(prompts, np.random.default_rng(1).integers(4, vocab, (BATCH, PROMPT)))
        records = []
        for r in range(rounds):
            for dtype in dtypes:
                with_ref = model == "anchor" and dtype == "float32" and anchors_dir()
                kinds = ("jax", "hf", "ref") if with_ref else ("jax", "hf")
                for kind in kinds:
                    common.log(f"[{time.strftime('%H:%M:%S')}] {model} round {r + 1}/{rounds}: "
                               f"{kind} {dtype}")
                    record = runner.worker(model, kind, "--folder", folder, "--prompts", prompts,
                                           "--reps", str(reps), "--dtype", dtype)
                    records.append(dict(record, dtype=dtype))  # a failed worker's record too
    return summarise(model, folder, rounds, reps, records, bandwidth, peaks)


def summarise(model: str, folder: str, rounds: int, reps: int, records: list[dict],
              bandwidth: float | None, peaks: dict | None = None) -> dict:
    """Per precision and mode: medians over rounds, speedup vs target, decode step vs the
    bandwidth bound and the roofline (`summarise_dtype`; peaks: GEMM FLOP/s per dtype); then
    `best`: each framework at its faster precision."""
    out = dict(model=model, folder=folder if model != "anchor" else "(random init, temp dir)",
               rounds=rounds, reps=reps, failed=[r["cmd"] for r in records if "error" in r])
    out["dtypes"] = {}
    for dtype in DTYPES:
        mine = [r for r in records if r["dtype"] == dtype]
        if mine:
            out["dtypes"][dtype] = summarise_dtype(model, dtype, mine, bandwidth,
                                                   (peaks or {}).get(dtype))
    done = {d: m for d, m in out["dtypes"].items() if "error" not in m}
    if not done:
        return dict(out, error="a framework produced no record", records=records)
    out["best"] = {}
    for mode in MODES:
        pick = {k: max(done, key=lambda d: done[d][mode][f"{k}_new_tok_s"]) for k in ("jax", "hf")}
        jax_tok_s, hf_tok_s = (done[pick[k]][mode][f"{k}_new_tok_s"] for k in ("jax", "hf"))
        ratio = jax_tok_s / hf_tok_s
        out["best"][mode] = dict(jax_dtype=pick["jax"], hf_dtype=pick["hf"], jax_new_tok_s=jax_tok_s,
                                 hf_new_tok_s=hf_tok_s, speedup=round(ratio, 2),
                                 target=TARGETS[mode], met=bool(ratio >= TARGETS[mode]))
    for r in records:  # the token ids were only needed for the agreement
        r.get("greedy", {}).pop("tokens", None)
    ok = [r for r in records if "error" not in r]
    out["versions"] = {k: v for r in ok for k, v in r["versions"].items()}
    out["jax_unroll_layers"] = next((r["unroll_layers"] for r in ok if r["framework"] == "jax"), None)
    out["hf_attn_implementation"] = next(
        (r["attn_implementation"] for r in ok if r["framework"] == "hf"), None)
    out["records"] = records
    return out


def summarise_dtype(model: str, dtype: str, records: list[dict], bandwidth: float | None,
                    peak: float | None = None) -> dict:
    """One precision's records: per mode the median new tok/s over rounds of each framework,
    the speedup (and the best round's), the decode step and its distance from the bound; with
    the GEMM peak too, the `roofline`: each framework's prefill MFU, its decode step against
    the roofline step, and the ceiling, HF's call over the roofline call (no framework on this
    machine can beat HF by more)."""
    ok = {k: [r for r in records if r.get("framework") == k and "error" not in r] for k in ("jax", "hf")}
    if not ok["jax"] or not ok["hf"]:
        return dict(error=f"a framework produced no {dtype} record")
    # S of the KV cache a decode step reads: ours the full allocation, HF's growing cache its mean
    kv_len = {"jax": PROMPT + NEW, "hf": PROMPT + NEW // 2}
    bound = {k: step_bytes(model, s, dtype) for k, s in kv_len.items()}
    out = dict(bytes_per_step=bound)
    roof = roofline(model, dtype, peak, bandwidth) if peak and bandwidth else None
    if roof:
        out["roofline"] = dict({k[:-2] + "_ms": round(1e3 * v, 3) for k, v in roof.items()},
                               peak_gflops=round(peak / 1e9, 1))
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    for kind, rs in ok.items():
        out[f"{kind}_prefill_ms"] = round(1e3 * med(rs, lambda r: r["prefill"]["median_s"]), 2)
        out[f"{kind}_peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        out[f"{kind}_max_others_cpu_frac"] = max(r["others_cpu_frac"] for r in rs)
        if roof:
            out[f"{kind}_prefill_mfu"] = round(roof["prefill_s"] / (out[f"{kind}_prefill_ms"] / 1e3), 3)
    for mode in MODES:
        row = {}
        for kind, rs in ok.items():
            row[f"{kind}_new_tok_s"] = round(med(rs, lambda r: r[mode]["new_tokens_per_s"]), 1)
            row[f"{kind}_new_tok_s_per_round"] = [round(r[mode]["new_tokens_per_s"], 1) for r in rs]
            row[f"{kind}_call_ms"] = round(1e3 * med(rs, lambda r: r[mode]["call"]["median_s"]), 1)
            decode = med(rs, lambda r: r[mode]["decode_step_s"])
            row[f"{kind}_decode_ms_per_step"] = round(1e3 * decode, 3)
            row[f"{kind}_first_call_s"] = round(rs[0][mode]["first_call_s"], 2)
            if bandwidth:
                bound_s = bound[kind]["total"] / (bandwidth * 1e9)
                row[f"{kind}_bound_ms_per_step"] = round(1e3 * bound_s, 3)
                row[f"{kind}_x_bound"] = round(decode / bound_s, 2)
            if roof:
                row[f"{kind}_x_roofline"] = round(decode / roof["step_s"], 2)
        row["jax_compile_s_approx"] = round(ok["jax"][0][mode]["compile_s_approx"], 2)
        row["speedup"] = round(row["jax_new_tok_s"] / row["hf_new_tok_s"], 2)
        # The VM's speed drifts over tens of seconds, for every framework alike (README): the best
        # round of each framework is the other summary, taken the same way for both
        row["speedup_best_round"] = round(max(row["jax_new_tok_s_per_round"])
                                          / max(row["hf_new_tok_s_per_round"]), 2)
        row["target"] = TARGETS[mode]
        row["met"] = bool(row["speedup"] >= TARGETS[mode])
        if roof:
            row["ceiling_speedup"] = round(row["hf_call_ms"] / 1e3 / roof["call_s"], 2)
        out[mode] = row
    out["greedy_token_agreement_with_hf"] = _agreement(ok["jax"][0], ok["hf"][0])
    refs = [r for r in records if r.get("framework") == "ref" and "error" not in r]
    if refs:
        out["reference"] = summarise_reference(refs, ok["jax"], ok["hf"])
    return out


def _agreement(a: dict, b: dict) -> float:
    """Share of the greedy new tokens two records agree on."""
    same = [x == y for ra, rb in zip(a["greedy"]["tokens"], b["greedy"]["tokens"]) for x, y in zip(ra, rb)]
    return round(sum(same) / len(same), 4)


def summarise_reference(refs: list[dict], jax_records: list[dict], hf_records: list[dict]) -> dict:
    """The issue's minimal decode loop beside ours and HF's in the same rounds: per mode its
    median new tok/s over rounds, its speedup over HF (the issue quotes it reaching 2.0× greedy
    and 3.05× top-p on the machine its targets were set on) and ours over it."""
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    out = dict(prefill_ms=round(1e3 * med(refs, lambda r: r["prefill"]["median_s"]), 2),
               peak_rss_mib=max(r["peak_rss_mib"] for r in refs),
               max_others_cpu_frac=max(r["others_cpu_frac"] for r in refs),
               greedy_token_agreement_with_hf=_agreement(refs[0], hf_records[0]),
               greedy_token_agreement_with_jax=_agreement(refs[0], jax_records[0]))
    for mode in MODES:
        tok_s = {k: med(rs, lambda r: r[mode]["new_tokens_per_s"])
                 for k, rs in (("ref", refs), ("jax", jax_records), ("hf", hf_records))}
        out[mode] = dict(ref_new_tok_s=round(tok_s["ref"], 1),
                         ref_new_tok_s_per_round=[round(r[mode]["new_tokens_per_s"], 1) for r in refs],
                         ref_decode_ms_per_step=round(1e3 * med(refs, lambda r: r[mode]["decode_step_s"]), 3),
                         ref_speedup_over_hf=round(tok_s["ref"] / tok_s["hf"], 2),
                         jax_speedup_over_ref=round(tok_s["jax"] / tok_s["ref"], 2))
    return out


def noise(models: dict, membw: dict) -> dict:
    records = [r for m in models.values() for r in m.get("records", [])]
    return dict(bench_dpo.noise(records, name=lambda r: f"{r['group']}/{r['framework']}"),
                membw_waited_for_quiet_s=membw.get("waited_for_quiet_s"))


def _cpu_line(host: dict | None, cpus: int | None) -> str:
    """' CPU: name (family, model), N cores.' for the report's first paragraph."""
    if not host:
        return ""
    return (f" CPU: {host['cpu']} (family {host.get('cpu_family')}, model {host.get('cpu_model')}), "
            f"{cpus} cores.")


ROW_COLUMNS = ["model", "precision", "mode", "jax new tok/s", "hf new tok/s", "speedup", "best round",
               "target", "met?", "ceiling", "compile s", "prefill ms", "prefill MFU", "decode ms/step",
               "bound ms/step", "×bound", "roofline ms/step", "×roofline", "peak RSS MiB", "others"]


def _mode_table(intro: str, columns: list[str], per_model: dict, cells) -> list[str]:
    """A section with one row per model and mode: `cells(per_model[name][mode], per_model[name])`
    after the model and mode cells; nothing when no model has one."""
    if not per_model:
        return []
    lines = ["", intro, "", *tables.table_head(["model", "mode", *columns])]
    for name, summary in per_model.items():
        for mode in MODES:
            lines.append("| " + " | ".join([name, mode, *cells(summary[mode], summary)]) + " |")
    return lines


def markdown(result: dict) -> str:
    bw = result["membw"].get("bandwidth_gbs")
    lines = [
        f"# Sampler benchmark {result['stamp']} (allocator: {result['allocator']})", "",
        f"`{result['command']}` — {result['total_wall_s']:.0f} s. Batch {BATCH}, prompt {PROMPT}, "
        f"{NEW} new tokens (EOS off); top-p {TOP_P} at temperature 1 (HF top_k=0). Precision: "
        "fp32 = fp32 weights and compute on both sides; bf16 = bf16 weights and compute on both "
        "sides (fp32 logits); the speedup is at the same precision. "
        f"Memory bandwidth (best jitted `x + 1` over {MEMBW_MIB} MiB, read + write): "
        f"{bw if bw else 'not measured'} GB/s.{_cpu_line(result.get('host'), result.get('cpus'))}", "",
        "new tok/s = 16 · 32 / median call (prefill + decode), median over rounds; best round = "
        "the fastest round of each framework (the VM's speed drifts over tens of seconds, for "
        "every framework alike). decode ms/step = (median call − "
        f"prefill) / {NEW - 1}. bound = (block weights + LM head + K,V cache of S slots, in the "
        f"row's precision) / bandwidth, S = {PROMPT + NEW} for jax (full cache read every step), "
        f"{PROMPT + NEW // 2} for HF (its growing cache, mean); ×bound = decode / bound. Cells with "
        "two values: jax / hf. compile s ≈ first call − median call (jax). `others` = share of the "
        "CPUs other processes used while timing (worst worker).", "",
        "Roofline (what no framework can beat on this machine; GEMM peak = best 2048³ matmul of "
        "any library, `matmul_peak.py`): prefill MFU = prefill FLOPs / prefill time / peak; "
        "roofline ms/step = max(step FLOPs / peak, step bytes / bandwidth) at the mean cache of "
        f"S = {PROMPT + NEW // 2}; ×roofline = decode / that; ceiling = HF's median call / (prefill "
        f"FLOPs / peak + {NEW - 1} roofline steps), the largest speedup over HF this machine allows.", "",
        *tables.table_head(ROW_COLUMNS)]
    for name, model in result["models"].items():
        if "skipped" in model or "error" in model:
            lines.append(tables.table_row([name, model.get("skipped") or "FAILED: " + model["error"]],
                                          len(ROW_COLUMNS)))
            continue
        for dtype, m in model["dtypes"].items():
            if "error" in m:
                lines.append(tables.table_row([name, dtype, f"FAILED: {m['error']}"], len(ROW_COLUMNS)))
                continue
            for mode in MODES:
                r = m[mode]

                def two(key, fmt, r=r):
                    """'jax / hf' cell, empty when not measured (no bandwidth: no bound)."""
                    return f"{r[f'jax_{key}']:{fmt}} / {r[f'hf_{key}']:{fmt}}" if f"jax_{key}" in r else ""
                roof = m.get("roofline")  # absent without a GEMM peak or a bandwidth
                ceiling = f"{r['ceiling_speedup']:.2f}×" if roof else ""
                roof_step = f"{roof['step_ms']:.2f}" if roof else ""
                lines.append(
                    f"| {name} | {PRECISION[dtype]} | {mode} | {r['jax_new_tok_s']:.0f} | "
                    f"{r['hf_new_tok_s']:.0f} | {r['speedup']:.2f}× | {r['speedup_best_round']:.2f}× | "
                    f"≥ {r['target']}× | {'yes' if r['met'] else '**no**'} | {ceiling} | "
                    f"{r['jax_compile_s_approx']:.1f} | {m['jax_prefill_ms']:.1f} / {m['hf_prefill_ms']:.1f} | "
                    f"{two('prefill_mfu', '.0%', m)} | "
                    f"{two('decode_ms_per_step', '.2f')} | {two('bound_ms_per_step', '.2f')} | "
                    f"{two('x_bound', '.1f')} | {roof_step} | {two('x_roofline', '.1f')} | "
                    f"{m['jax_peak_rss_mib']:.0f} / {m['hf_peak_rss_mib']:.0f} | "
                    f"{m['jax_max_others_cpu_frac']:.0%} / {m['hf_max_others_cpu_frac']:.0%} |")
    best = {name: model["best"] for name, model in result["models"].items() if "best" in model}
    lines += _mode_table(
        "Each framework at its faster precision (median new tok/s):",
        ["jax", "hf", "speedup", "target", "met?"], best,
        lambda r, _: [f"{r['jax_new_tok_s']:.0f} ({PRECISION[r['jax_dtype']]})",
                      f"{r['hf_new_tok_s']:.0f} ({PRECISION[r['hf_dtype']]})", f"{r['speedup']:.2f}×",
                      f"≥ {r['target']}×", "yes" if r["met"] else "**no**"])
    refs = {name: m["reference"] for name, model in result["models"].items()
            for m in model.get("dtypes", {}).values() if "reference" in m}
    lines += _mode_table(
        "The issue's minimal JAX decode loop (`../shared/anchors/jax_reference.py`: fp32, no padding "
        "mask, no stop handling; sort-free top-p), same weights, prompts and rounds (median new tok/s):",
        ["reference", "its speedup over HF", "ours over it", "its decode ms/step", "its prefill ms",
         "greedy tokens = HF / = ours"], refs,
        lambda r, ref: [f"{r['ref_new_tok_s']:.0f}", f"{r['ref_speedup_over_hf']:.2f}×",
                        f"{r['jax_speedup_over_ref']:.2f}×", f"{r['ref_decode_ms_per_step']:.2f}",
                        f"{ref['prefill_ms']:.1f}", f"{ref['greedy_token_agreement_with_hf']:.1%} / "
                        f"{ref['greedy_token_agreement_with_jax']:.1%}"])
    lines += [""]
    for name, model in result["models"].items():
        for dtype, m in model.get("dtypes", {}).items():
            if "bytes_per_step" in m:
                b = m["bytes_per_step"]
                lines.append(
                    f"- {name} {PRECISION[dtype]}: bytes per decode step = weights "
                    f"{b['jax']['weights'] / 2**20:.1f} MiB + KV {b['jax']['kv'] / 2**20:.1f} MiB "
                    f"(S={b['jax']['kv_len']}; HF {b['hf']['kv'] / 2**20:.1f} MiB at S={b['hf']['kv_len']}); "
                    f"greedy tokens equal to HF's: {m['greedy_token_agreement_with_hf']:.1%}.")
            if "roofline" in m:
                roof = m["roofline"]
                lines.append(
                    f"- {name} {PRECISION[dtype]} roofline: prefill {prefill_flops(name) / 1e9:.1f} GFLOP at "
                    f"{roof['peak_gflops']:.0f} GFLOP/s = {roof['prefill_ms']:.1f} ms; a decode step "
                    f"max(compute {roof['step_compute_ms']:.2f}, memory {roof['step_memory_ms']:.2f}) ms; "
                    f"call {roof['call_ms']:.1f} ms.")
        if "rounds" in model:
            lines.append(f"- {name}: rounds × reps {model['rounds']} × {model['reps']}; failed: "
                         f"{', '.join(model['failed']) or 'none'}.")
    lines += ["", common.noise_line(result["noise"], "workers"), ""]
    return "\n".join(lines)


def run_all(args) -> dict:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    runner = Runner(args)
    common.log(f"[{time.strftime('%H:%M:%S')}] memory bandwidth ({MEMBW_MIB} MiB x + 1)")
    membw = runner.worker("membw", "membw", retime=False)
    bandwidth = membw.get("bandwidth_gbs")
    common.log(f"  {bandwidth} GB/s")
    common.log(f"[{time.strftime('%H:%M:%S')}] GEMM peak (matmul_peak.py, jax and torch)")
    os.makedirs(args.results, exist_ok=True)
    gemm = bench_dpo.run_worker([os.path.join(HERE, "matmul_peak.py"), "--out",
                                 os.path.join(args.results, f"peaks-{stamp}.json")],
                                runner.env, "peak", args.timeout, args.wait_quiet, bench="sampler")
    peaks = {d: gemm.get(f"machine_{PRECISION[d]}") for d in DTYPES}
    common.log("  " + (gemm.get("error") or ", ".join(f"{PRECISION[d]} {v / 1e9:.0f} GFLOP/s"
                                                         for d, v in peaks.items() if v)))
    models = {}
    for model in (MODELS if args.model == "all" else (args.model,)):
        rounds, reps = (QUICK_PLAN if args.quick else DEFAULT_PLAN)[model]
        models[model] = run_model(runner, model, args.rounds or rounds, args.reps or reps, bandwidth,
                                  args.dtypes, peaks)
    result = dict(bench="sampler", stamp=stamp, command=" ".join(sys.argv), allocator=runner.allocator,
                  batch=BATCH, prompt_len=PROMPT, new_tokens=NEW, top_p=TOP_P, dtypes=list(args.dtypes),
                  targets=TARGETS, membw=membw, gemm_peaks=gemm, models=models, host=common.host(),
                  cpus=len(os.sched_getaffinity(0)), total_wall_s=round(time.perf_counter() - t_start, 1))
    result["noise"] = noise(models, membw)
    path = os.path.join(args.results, f"sampler-{stamp}")
    with open(path + ".json", "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    table = markdown(result)
    with open(path + ".md", "w") as fh:
        fh.write(table)
    common.log(table)
    common.log(f"wrote {path}.json and .md ({result['total_wall_s']} s)")
    return result


def _dtypes(text: str) -> tuple[str, ...]:
    """--dtypes: a comma-separated subset of DTYPES, in the given order."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(DTYPES)}")
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", *MODELS], default="all")
    ap.add_argument("--quick", action="store_true",
                    help="1 round; 3 reps (anchor), 2 reps (smollm2-135m)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="jax+hf process pairs per model (default: " + ", ".join(
                        f"{m} {r}" for m, (r, _) in DEFAULT_PLAN.items()) + ")")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per mode and worker (default: " + ", ".join(
                        f"{m} {n}" for m, (_, n) in DEFAULT_PLAN.items()) + ")")
    ap.add_argument("--alloc", choices=["auto", "tcmalloc", "glibc"], default="auto",
                    help="allocator of every worker: auto = tcmalloc (LD_PRELOAD) when installed")
    ap.add_argument("--tcmalloc", dest="alloc", action="store_const", const="tcmalloc",
                    help="= --alloc tcmalloc (as bench_dpo.py)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each worker, wait up to S s for other processes to use < 10%% CPU")
    ap.add_argument("--retries", type=int, default=1,
                    help="re-time a worker up to N times when other processes took > 10%% of the CPUs")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads for HF (default: torch's, = cores)")
    ap.add_argument("--dtypes", type=_dtypes, default=DTYPES, metavar="LIST",
                    help="precisions to time, comma-separated (default: float32,bfloat16)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", choices=["build", "membw", "jax", "hf", "ref"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "build":
        common.emit(worker_build(args.folder))
    elif args.worker == "membw":
        common.emit(worker_membw())
    elif args.worker == "jax":
        common.emit(finish_worker(worker_jax(args.folder, args.prompts, args.reps, args.dtype)))
    elif args.worker == "ref":
        common.emit(finish_worker(worker_ref(args.folder, args.prompts, args.reps)))
    elif args.worker == "hf":
        common.emit(finish_worker(worker_hf(args.folder, args.prompts, args.reps, args.torch_threads,
                                            args.dtype)))
    else:
        result = run_all(args)
        line = {k: v for k, v in result.items() if k != "models"}
        line["models"] = {name: {k: v for k, v in m.items() if k != "records"}
                          for name, m in result["models"].items()}
        print(json.dumps(line, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
