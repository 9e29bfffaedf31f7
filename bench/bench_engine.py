"""Inference outside training, side by side: the negatives workload (continuous-batching engine
vs the static sampler vs HF `generate`) and Dialogue-NLI scoring (a cached prompt with its
candidates in short rows vs packed shared-prompt rows vs one row per candidate vs an HF PyTorch
scorer that reuses the prompt's KV cache).

    .venv/bin/python bench/bench_engine.py [--model all|anchor|smollm2-135m] [--quick]
        [--dtypes float32,bfloat16] [--workloads negatives,dnli]
        [--dnli-kinds cached,packed,full,hf_kv] [--alloc auto|tcmalloc|glibc] [--wait-quiet S]

Negatives workload (what the negatives stage runs): prompts are Synthetic-Persona-Chat test
records (the training split) under a swapped persona, encoded as the configs encode them
(SmolLM2: the chat template; the anchor: the English template and the demo's 4k BPE, whose ids
fit its 8k vocab), top-p 0.9, temperature 1, `data.max_response_tokens` = 48 new tokens at most,
32 rows at once (the configs' negatives.batch_size). SmolLM2 ends replies with its own EOS. The
anchor has random weights and would never stop, so each reply is given the length of the
record's reference reply (+ EOS, capped at 48) as its budget: every framework then makes the
same useful tokens, and a static batch runs to its longest row, as with real EOS. Useful
tokens = the tokens of the replies (EOS included); useful tok/s = their sum / wall time of the
whole workload (prefills, decode, host work); busy = useful tokens / decode slot-steps run.
Each framework and precision runs in its own process: one untimed pass (compiles), one timed.

Dialogue-NLI scoring (fp32, as the eval stage scores): the first examples of the embedded
DNLI files (round-robin over relation groups), every candidate, prompts encoded as above.
candidates/s over the whole set; one untimed pass (compiles), one timed. The HF peer runs the
prompt once with `use_cache=True`, repeats its KV cache for the candidates and scores them as
one right-padded batch of continuations (the strongest simple PyTorch scorer).

Writes bench/results/engine-<stamp>.json (every record) and engine-<stamp>.md; prints progress
on stderr and the summary as one JSON line on stdout.
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
import common  # noqa: E402  (offline env vars before transformers)
import bench_dpo  # noqa: E402
import bench_sampler  # noqa: E402
from pdpo_jax import tables  # noqa: E402

SLOTS, MAX_NEW, TOP_P = 32, 48, 0.9
PLAN = {"anchor": dict(prompts=256, dnli=60), "smollm2-135m": dict(prompts=96, dnli=18)}
QUICK = {"anchor": dict(prompts=64, dnli=12), "smollm2-135m": dict(prompts=32, dnli=6)}
TARGETS = {"engine_vs_static": 2.0, "engine_vs_hf": 4.0, "dnli_vs_full": 5.0, "dnli_vs_hf_kv": 1.5}


# --------------------------------------------------------------------------------------------
# Workloads (built once per model by the parent, as JSON files the workers read)


def _encoder(model: str):
    """(tokenizer, template, eos id or None) the model's workload is encoded with."""
    import transformers
    if model == "anchor":
        return transformers.AutoTokenizer.from_pretrained(os.path.join(bench_dpo.REPO, "data", "tokenizer_demo")), "english", None
    tok = transformers.AutoTokenizer.from_pretrained(bench_sampler.smollm2_dir())
    return tok, "chat", tok.eos_token_id


def build_workloads(model: str, n_prompts: int, n_dnli: int, path: str) -> dict:
    """Negatives prompts (ids, budget) and DNLI examples (prompt ids, candidate ids)."""
    from pdpo_jax import data as pdata
    from pdpo_jax.eval.dnli import select_examples
    from pdpo_jax.sampling.negatives import swapped_personas
    tok, template, eos = _encoder(model)
    records = pdata.read_turns(pdata.default_paths().train)[::4]
    personas = swapped_personas(records, seed=0)
    prompts = []
    for rec, persona in zip(records, personas):  # the stages' rule: a record that cannot be
        try:                                     # encoded (no partner turn for a chat template)
            enc = pdata.encode_pair(tok, template, persona, rec.history, rec.response,
                                    max_prompt_tokens=192 - MAX_NEW)
        except pdata.DoesNotFit:                 # is skipped
            continue
        prompts.append(dict(ids=enc.prompt_ids.tolist(),
                            budget=min(len(enc.response_ids), MAX_NEW) if eos is None else MAX_NEW))
        if len(prompts) == n_prompts:
            break
    dnli = []
    for ex in select_examples(pdata.read_dnli_files(pdata.default_paths().dnli), n_dnli):
        try:
            encs = [pdata.encode_pair(tok, template, ex.persona, ex.history, text,
                                      max_prompt_tokens=192) for text, _ in ex.candidates]
        except pdata.DoesNotFit:
            continue
        dnli.append(dict(prompt=encs[0].prompt_ids.tolist(),
                         candidates=[e.response_ids.tolist() for e in encs]))
    workload = dict(model=model, eos=eos, prompts=prompts, dnli=dnli)
    with open(path, "w") as f:
        json.dump(workload, f)
    return dict(prompts=len(prompts), dnli=len(dnli),
                candidates=sum(len(d["candidates"]) for d in dnli),
                prompt_tokens_mean=sum(len(p["ids"]) for p in prompts) / len(prompts))


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _twice(run) -> tuple[float, object, dict]:
    """(seconds of the second call, its result, its noise record): the first call compiles."""
    run()
    with common.Meter() as meter:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    return seconds, result, meter.result


# --------------------------------------------------------------------------------------------
# Workers: negatives


def worker_negatives(folder: str, workload: str, kind: str, dtype: str) -> dict:
    """kind: engine | static (ours) | hf."""
    w = _load(workload)
    prompts, eos = w["prompts"], w["eos"]
    if kind == "hf":
        seconds, lengths, steps, meter = _hf_negatives(folder, prompts, eos, dtype)
    else:
        seconds, lengths, steps, meter = _jax_negatives(folder, prompts, eos, dtype, kind)
    useful = int(sum(lengths))
    return dict(bench="engine", workload="negatives", framework=kind, dtype=dtype,
                prompts=len(prompts), seconds=seconds, useful_tokens=useful,
                useful_tok_s=useful / seconds, replies_per_s=len(prompts) / seconds,
                mean_reply_tokens=useful / len(prompts), slot_steps=steps,
                busy=useful / steps if steps else None, **meter)


def _jax_negatives(folder, prompts, eos, dtype, kind):
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()  # as `python -m pdpo_jax.train` runs the negatives stage
    import numpy as np
    from pdpo_jax.models import from_pretrained
    from pdpo_jax.sampling import Sampler, SamplingConfig
    from pdpo_jax.sampling.engine import Engine, Request
    model = from_pretrained(folder, dtype=dtype, param_dtype=dtype, stack_layers=False)
    cfg = SamplingConfig(MAX_NEW, top_p=TOP_P, eos_ids=() if eos is None else (eos,))
    ids = [p["ids"] for p in prompts]
    budgets = [p["budget"] for p in prompts]
    if kind == "engine":
        engine = Engine(model, cfg, slots=SLOTS)
        cache_len = max(len(i) for i in ids) + MAX_NEW + 32

        def run():
            scheduler = engine.scheduler(cache_len=cache_len)
            requests = [Request(p, b, example_id=k, top_p=TOP_P) for k, (p, b) in enumerate(zip(ids, budgets))]
            for r in requests:
                scheduler.submit(r)
            while scheduler.busy:
                scheduler.step()
            return [len(r.tokens) for r in requests], scheduler.slot_steps
    else:
        sampler = Sampler(model, cfg)
        order = np.argsort([len(i) for i in ids], kind="stable")  # as the stage batched before

        def run():
            lengths, steps = [], 0
            for lo in range(0, len(order), SLOTS):
                chunk = [int(k) for k in order[lo:lo + SLOTS]]
                filled = chunk + [chunk[0]] * (SLOTS - len(chunk))
                out = sampler.generate([ids[k] for k in filled], example_ids=filled,
                                       cfg=cfg if eos is not None else
                                       SamplingConfig(max(budgets[k] for k in chunk), top_p=TOP_P))
                got = [min(int(out.lengths[j]), budgets[k]) for j, k in enumerate(chunk)]
                lengths += got
                steps += SLOTS * (int(out.lengths[:len(chunk)].max()) - 1)
            return lengths, steps
    seconds, (lengths, steps), meter = _twice(run)
    return seconds, lengths, steps, meter


def _hf_negatives(folder, prompts, eos, dtype):
    import torch
    import transformers
    from pdpo_jax.data.batches import left_pad
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]["ids"]))

    def run():
        torch.manual_seed(0)
        lengths, steps = [], 0
        for lo in range(0, len(order), SLOTS):
            chunk = order[lo:lo + SLOTS]
            tokens, mask = left_pad([prompts[k]["ids"] for k in chunk], 0)
            budget = MAX_NEW if eos is not None else max(prompts[k]["budget"] for k in chunk)
            with torch.inference_mode():
                out = model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                                     attention_mask=torch.as_tensor(mask, dtype=torch.long),
                                     do_sample=True, top_p=TOP_P, top_k=0, temperature=1.0,
                                     max_new_tokens=budget, min_new_tokens=1 if eos else budget,
                                     eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
            new = out[:, tokens.shape[1]:].numpy()
            for j, k in enumerate(chunk):
                n = budget if eos is None else _until_eos(new[j], eos)
                lengths.append(min(n, prompts[k]["budget"]))
            steps += len(chunk) * (new.shape[1] - 1)
        return lengths, steps
    seconds, (lengths, steps), meter = _twice(run)
    return seconds, lengths, steps, meter


def _until_eos(row, eos) -> int:
    hits = [i for i, t in enumerate(row.tolist()) if t == eos]
    return hits[0] + 1 if hits else len(row)


# --------------------------------------------------------------------------------------------
# Workers: Dialogue-NLI scoring


def worker_dnli(folder: str, workload: str, kind: str) -> dict:
    """kind: cached (ours, the eval default: the prompt's cache, candidates in short rows) |
    packed (ours, a prompt and its candidates per row) | full (ours, a row per candidate) | hf_kv."""
    w = _load(workload)
    examples = w["dnli"]
    n = sum(len(e["candidates"]) for e in examples)
    run = _hf_dnli(folder, examples) if kind == "hf_kv" else _jax_dnli(folder, examples, kind)
    seconds, sums, meter = _twice(run)
    return dict(bench="engine", workload="dnli", framework=kind, dtype="float32",
                examples=len(examples), candidates=n, seconds=seconds,
                candidates_per_s=n / seconds, scores=[round(s, 4) for s in sums], **meter)


def _jax_dnli(folder, examples, kind):
    from pdpo_jax.allocator import synchronous_cpu_dispatch
    synchronous_cpu_dispatch()
    from flax import nnx
    from pdpo_jax.models import from_pretrained
    graphdef, params = nnx.split(from_pretrained(folder))
    return jax_dnli_scorer(graphdef, params, [(e["prompt"], e["candidates"]) for e in examples],
                           kind, 32 if kind == "full" else 4)


def jax_dnli_scorer(graphdef, params, examples, kind: str, batch: int):
    """run() -> every candidate's Σ log-prob, example by example, as the eval stage scores them
    (`dnli_scoring`, fp32 matmuls): kind 'cached' (each prompt's KV cache computed once, its
    candidates in short rows; `batch` examples per call), 'packed' (a prompt once per row, its
    candidates as segments) or 'full' (a row per candidate), `batch` rows per call. examples:
    (prompt ids, [candidate ids, ...]) pairs. Also bench/gpu_check.py's scorer."""
    import jax
    from pdpo_jax.eval import dnli_scoring
    encoded = [dnli_scoring._Example(i, p, c) for i, (p, c) in enumerate(examples)]
    calls = dnli_scoring.LAYOUTS[kind]

    def run():
        sums = {}
        with jax.default_matmul_precision(dnli_scoring.SCORING_PRECISION):
            for owners, logp in calls(graphdef, params, encoded, batch, 0,
                                      dnli_scoring.LOGIT_CHUNK, None):
                dnli_scoring._accumulate(sums, owners, logp)
        return [sums[(i, j)] for i, (_, c) in enumerate(examples) for j in range(len(c))]
    return run


def _hf_dnli(folder, examples):
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run():
        sums = []
        with torch.inference_mode():
            for e in examples:
                sums += _hf_kv_scores(model, e["prompt"], e["candidates"])
        return sums
    return run


def _hf_kv_scores(model, prompt, candidates) -> list[float]:
    """Σ log p(candidate | prompt): the prompt's forward once, its KV cache repeated for the
    candidates, which run as one right-padded batch of continuations."""
    import torch
    out = model(input_ids=torch.as_tensor([prompt]), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = out.past_key_values
    K, C = len(candidates), max(len(c) for c in candidates)
    cache.batch_repeat_interleave(K)
    ids = torch.zeros((K, C), dtype=torch.long)
    mask = torch.zeros((K, len(prompt) + C), dtype=torch.long)
    mask[:, :len(prompt)] = 1
    for k, c in enumerate(candidates):
        ids[k, :len(c)] = torch.as_tensor(c)
        mask[k, len(prompt):len(prompt) + len(c)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, past_key_values=cache)
                             .logits.float(), -1)
    sums = []
    for k, c in enumerate(candidates):
        total = first[c[0]] + sum(logp[k, t - 1, c[t]] for t in range(1, len(c)))
        sums.append(float(total))
    return sums


# --------------------------------------------------------------------------------------------
# The run


DNLI_KINDS = ("cached", "packed", "full", "hf_kv")


def run_model(runner, model: str, plan: dict, dtypes, workloads=("negatives", "dnli"),
              dnli_kinds=DNLI_KINDS) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        folder = os.path.join(tmp, "anchor") if model == "anchor" else bench_sampler.smollm2_dir()
        if model == "anchor":
            runner.worker(model, "build", "--folder", folder)
        elif not os.path.exists(os.path.join(folder, "model.safetensors")):
            return dict(model=model, skipped=f"no SmolLM2-135M folder at {folder}")
        workload = os.path.join(tmp, "workload.json")
        info = build_workloads(model, plan["prompts"], plan["dnli"], workload)
        common.log(f"[{model}] workload: {info}")
        records = []
        for dtype in dtypes if "negatives" in workloads else ():
            for kind in ("engine", "static", "hf"):
                records.append(runner.worker(model, "negatives", "--folder", folder, "--workload",
                                             workload, "--kind", kind, "--dtype", dtype))
        for kind in dnli_kinds if "dnli" in workloads else ():
            records.append(runner.worker(model, "dnli", "--folder", folder, "--workload", workload,
                                         "--kind", kind))
    return dict(model=model, workload=info, records=records, summary=summarise(records))


def summarise(records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r and r.get("bench") == "engine"]
    by = {(r["workload"], r["framework"], r["dtype"]): r for r in ok}
    out = {}
    for dtype in ("float32", "bfloat16"):
        e, s, h = (by.get(("negatives", k, dtype)) for k in ("engine", "static", "hf"))
        if e and s and h:
            out[f"negatives_{dtype}"] = dict(
                engine_vs_static=e["useful_tok_s"] / s["useful_tok_s"],
                engine_vs_hf=e["useful_tok_s"] / h["useful_tok_s"])
    ours = by.get(("dnli", "cached", "float32"))
    if ours:  # each ratio where its peer ran (--dnli-kinds)
        dnli = {}
        for kind, key in (("full", "dnli_vs_full"), ("hf_kv", "dnli_vs_hf_kv"),
                          ("packed", "cached_vs_packed")):
            if peer := by.get(("dnli", kind, "float32")):
                dnli[key] = ours["candidates_per_s"] / peer["candidates_per_s"]
                dnli[f"max_abs_diff_vs_{kind}"] = max(
                    abs(a - b) for a, b in zip(ours["scores"], peer["scores"]))
        out["dnli"] = dnli
    return out


class Runner:
    def __init__(self, args):
        lib = bench_dpo.find_tcmalloc() if args.alloc != "glibc" else None
        if args.alloc == "tcmalloc" and lib is None:
            sys.exit(f"--alloc tcmalloc: {bench_dpo.TCMALLOC} not found (apt-get install -y libtcmalloc-minimal4)")
        self.env, self.args = bench_dpo.worker_env(lib, HERE), args
        self.allocator = "tcmalloc" if lib else "glibc"

    def worker(self, group: str, kind: str, *extra: str) -> dict:
        common.log(f"[{time.strftime('%H:%M:%S')}] {group}: {kind} {' '.join(extra[-4:])}")
        record = bench_dpo.run_worker([os.path.abspath(__file__), "--worker", kind, *extra],
                                      self.env, group, self.args.timeout, self.args.wait_quiet,
                                      bench="engine")
        if "error" in record:
            common.log(f"  FAILED ({record['error']}):\n{record['stderr_tail']}")
        else:
            common.log("  " + ", ".join(f"{k} {record[k]:.3g}" for k in
                                        ("seconds", "useful_tok_s", "candidates_per_s", "busy")
                                        if isinstance(record.get(k), (int, float))))
        return record


def markdown(result: dict) -> str:
    lines = [f"# Engine benchmark {result['stamp']}", "",
             f"Host: {result['host'].get('cpu')} ({result['host'].get('cpus')} CPUs), allocator "
             f"{result['allocator']}. Targets: negatives ≥ {TARGETS['engine_vs_static']}× the static "
             f"sampler and ≥ {TARGETS['engine_vs_hf']}× HF generate in useful tok/s; DNLI ≥ "
             f"{TARGETS['dnli_vs_full']}× one row per candidate and ≥ {TARGETS['dnli_vs_hf_kv']}× "
             "the KV-reusing HF scorer.", ""]
    for name, m in result["models"].items():
        if "skipped" in m:
            lines += [f"## {name}: {m['skipped']}", ""]
            continue
        lines += [f"## {name}", "", f"Workload: {m['workload']}", "",
                  *tables.table_head(["workload", "framework", "dtype", "seconds", "useful tok/s",
                                      "replies/s", "cand/s", "busy", "others"])]
        for r in m["records"]:
            if r.get("bench") != "engine":
                continue
            if "error" in r:
                lines.append(tables.table_row([r.get("cmd", "?"), f"FAILED {r['error']}"], 9))
                continue
            lines.append(tables.table_row([
                r["workload"], r["framework"], r["dtype"], f"{r['seconds']:.1f}",
                f"{r.get('useful_tok_s', 0):.0f}" if "useful_tok_s" in r else "",
                f"{r['replies_per_s']:.2f}" if "replies_per_s" in r else "",
                f"{r['candidates_per_s']:.0f}" if "candidates_per_s" in r else "",
                f"{r['busy']:.0%}" if r.get("busy") else "", f"{r['others_cpu_frac']:.0%}"]))
        lines += ["", *tables.table_head(["ratio", "value", "target", "met"])]
        for group, ratios in m["summary"].items():
            for key, value in ratios.items():
                target = TARGETS.get(key)
                lines.append(tables.table_row([f"{group} {key}", f"{value:.3g}",
                                               f"≥ {target}" if target else "",
                                               ("yes" if value >= target else "no") if target else ""]))
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["build", "negatives", "dnli"])
    p.add_argument("--folder"), p.add_argument("--workload"), p.add_argument("--kind")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default="all", choices=["all", "anchor", "smollm2-135m"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--workloads", default="negatives,dnli",
                   help="comma-separated subset of negatives,dnli")
    p.add_argument("--dnli-kinds", default=",".join(DNLI_KINDS),
                   help=f"comma-separated subset of {','.join(DNLI_KINDS)}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--alloc", default="auto", choices=["auto", "tcmalloc", "glibc"])
    p.add_argument("--wait-quiet", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    if args.worker:
        if args.worker == "build":
            record = bench_sampler.worker_build(args.folder)
        elif args.worker == "negatives":
            record = worker_negatives(args.folder, args.workload, args.kind, args.dtype)
        else:
            record = worker_dnli(args.folder, args.workload, args.kind)
        record.update(allocator=common.allocator(), peak_rss_mib=round(common.peak_rss_mib(), 1))
        print(json.dumps(record))
        return
    workloads = tuple(args.workloads.split(","))
    if not workloads or set(workloads) - {"negatives", "dnli"}:
        p.error(f"--workloads {args.workloads!r}: a comma-separated subset of negatives,dnli")
    dnli_kinds = tuple(args.dnli_kinds.split(","))
    if set(dnli_kinds) - set(DNLI_KINDS):
        p.error(f"--dnli-kinds {args.dnli_kinds!r}: a comma-separated subset of {','.join(DNLI_KINDS)}")
    runner = Runner(args)
    models = ("anchor", "smollm2-135m") if args.model == "all" else (args.model,)
    plan = QUICK if args.quick else PLAN
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = dict(stamp=stamp, host=common.host(), allocator=runner.allocator,
                  models={m: run_model(runner, m, plan[m], tuple(args.dtypes.split(",")), workloads,
                                        dnli_kinds)
                          for m in models})
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"engine-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result) + "\n")
    common.log(f"wrote {base}.json and .md")
    print(json.dumps({m: r.get("summary", r.get("skipped")) for m, r in result["models"].items()}))


if __name__ == "__main__":
    main()
