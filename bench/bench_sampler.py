"""New tokens/s of our jitted KV-cache sampler vs `transformers.generate` (torch, CPU, fp32).

    .venv/bin/python bench/bench_sampler.py [--rounds 2] [--reps 7]

Model and shapes mirror ../shared/anchors/common.py: Llama d=256, ff=688, 4 layers, 4 heads,
vocab 8000, untied; batch 16, prompt 96, exactly 32 new tokens (EOS off), greedy and top-p 0.9
(top_k=0 on the HF side: its default top_k=50 would otherwise apply too). Both frameworks get
the same weights (HF random init, read with our `from_pretrained`) and the same prompts.

Each framework runs in its own process (torch's OpenMP pool and XLA's pool never compete),
in the order jax, hf, jax, hf, ...; the JSON records that order, the load average and the CPU
steal, because the machine is shared and noisy. Time of one call includes the prefill;
new tokens/s = 16 * 32 / median call time. Compile time (jax) and first-call time (both) are
reported apart from the steady state. Prints progress on stderr and ONE json line on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
BATCH, PROMPT, NEW, TOP_P = 16, 96, 32, 0.9


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def cpu_ticks():
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


def steal_since(start):
    total, steal = cpu_ticks()
    return round((steal - start[1]) / max(1, total - start[0]), 4)


def build_checkpoint(folder: str):
    """The HF model (seed 0) saved to `folder`, and the prompts (seed 1)."""
    import numpy as np
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MODEL, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    prompts = np.random.default_rng(1).integers(4, MODEL["vocab_size"], (BATCH, PROMPT))
    np.save(os.path.join(folder, "prompts.npy"), prompts)


def timed(fn, reps: int):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def worker_jax(folder: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pdpo_jax.models import from_pretrained
    from pdpo_jax.sampling import Sampler, SamplingConfig
    model = from_pretrained(folder)
    tokens = np.load(os.path.join(folder, "prompts.npy")).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    configs = {"greedy": SamplingConfig(NEW, greedy=True),
               "top_p": SamplingConfig(NEW, top_p=TOP_P, temperature=1.0)}
    out = {}
    for mode, cfg in configs.items():
        sampler = Sampler(model, cfg)
        start = time.perf_counter()
        first = sampler.sample(tokens, mask)
        first_s = time.perf_counter() - start
        assert (first.lengths == NEW).all()
        times = timed(lambda: sampler.sample(tokens, mask), reps)
        median = statistics.median(times)
        out[mode] = dict(new_tokens_per_s=BATCH * NEW / median, median_s=median, min_s=min(times),
                         first_call_s=first_s, compile_s_approx=first_s - median)
        if mode == "greedy":
            out[mode]["tokens"] = first.tokens.tolist()
        log(f"[jax] {mode}: first call {first_s:.2f}s, {median * 1e3:.1f} ms/call -> "
            f"{out[mode]['new_tokens_per_s']:.0f} new tok/s")
    prefill = jax.jit(sampler.loop.prefill)
    args = (sampler.params, jnp.asarray(tokens), jnp.asarray(mask))
    jax.block_until_ready(prefill(*args))
    out["prefill_median_s"] = statistics.median(
        timed(lambda: jax.block_until_ready(prefill(*args)), 5))
    out["versions"] = dict(jax=jax.__version__)
    return out


def worker_hf(folder: str, reps: int, torch_threads: int | None) -> dict:
    import numpy as np
    import torch
    import transformers
    if torch_threads:
        torch.set_num_threads(torch_threads)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(os.path.join(folder, "prompts.npy")))
    attn = torch.ones_like(ids)
    base = dict(max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    configs = {"greedy": transformers.GenerationConfig(do_sample=False, **base),
               "top_p": transformers.GenerationConfig(do_sample=True, top_p=TOP_P, top_k=0,
                                                      temperature=1.0, **base)}
    out = {}
    for mode, gc in configs.items():
        torch.manual_seed(0)

        def run():
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)
        start = time.perf_counter()
        first = run()
        first_s = time.perf_counter() - start
        times = timed(run, reps)
        median = statistics.median(times)
        out[mode] = dict(new_tokens_per_s=BATCH * NEW / median, median_s=median, min_s=min(times),
                         first_call_s=first_s)
        if mode == "greedy":
            out[mode]["tokens"] = first[:, PROMPT:].tolist()
        log(f"[hf] {mode}: first call {first_s:.2f}s, {median * 1e3:.1f} ms/call -> "
            f"{out[mode]['new_tokens_per_s']:.0f} new tok/s")
    out["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__,
                           torch_threads=torch.get_num_threads())
    return out


def run_worker(kind: str, folder: str, reps: int, torch_threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--folder", folder, "--reps", str(reps)]
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["loadavg_1m_before"] = round(load_before, 2)
    return record


def summarise(records: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, runs in records.items():
        for mode in ("greedy", "top_p"):
            per_round = [r[mode]["new_tokens_per_s"] for r in runs]
            summary[f"{kind}_{mode}_new_tok_s"] = round(statistics.median(per_round), 1)
            summary[f"{kind}_{mode}_new_tok_s_per_round"] = [round(x, 1) for x in per_round]
            summary[f"{kind}_{mode}_first_call_s"] = round(runs[0][mode]["first_call_s"], 2)
        if kind == "jax":
            summary["jax_compile_s_approx"] = {m: round(runs[0][m]["compile_s_approx"], 2)
                                               for m in ("greedy", "top_p")}
            summary["jax_prefill_ms"] = round(1e3 * statistics.median(
                r["prefill_median_s"] for r in runs), 1)
    for mode in ("greedy", "top_p"):
        summary[f"speedup_{mode}"] = round(summary[f"jax_{mode}_new_tok_s"]
                                           / summary[f"hf_{mode}_new_tok_s"], 2)
    jax_tokens = records["jax"][0]["greedy"]["tokens"]
    hf_tokens = records["hf"][0]["greedy"]["tokens"]
    agree = [a == b for ra, rb in zip(jax_tokens, hf_tokens) for a, b in zip(ra, rb)]
    summary["greedy_token_agreement_with_hf"] = round(sum(agree) / len(agree), 4)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--worker", choices=["jax", "hf"])
    parser.add_argument("--folder")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for HF (default: torch's, = cores)")
    args = parser.parse_args()
    if args.worker:
        start = cpu_ticks()
        if args.worker == "jax":
            record = worker_jax(args.folder, args.reps)
        else:
            record = worker_hf(args.folder, args.reps, args.torch_threads)
        record["cpu_steal_frac"] = steal_since(start)
        print(json.dumps(record), flush=True)
        return
    start = cpu_ticks()
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder)
        records, order, loads = {"jax": [], "hf": []}, [], []
        for _ in range(args.rounds):
            for kind in ("jax", "hf"):
                records[kind].append(run_worker(kind, folder, args.reps, args.torch_threads))
                order.append(kind)
                loads.append(records[kind][-1]["loadavg_1m_before"])
    result = dict(bench="sampler", model=MODEL, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW,
                  top_p=TOP_P, dtype="float32", reps=args.reps, process_order=order,
                  cpus=len(os.sched_getaffinity(0)), cpu_steal_frac=steal_since(start),
                  loadavg_1m_before_each=loads,
                  allocator="tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc",
                  versions={**records["jax"][0]["versions"], **records["hf"][0]["versions"]},
                  **summarise(records))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
