"""The accelerator check: one prepared run on a GPU (or TPU) host (~5 minutes on one H200 for
the steps before `static`; `--steps` picks a subset that fits one call).

    bash bench/gpu_check.sh            # on the device machine (JAX with CUDA already installed)
    python bench/gpu_check.py --smoke  # the same steps on tiny shapes, on any backend
    (tests/test_bench_harness.py runs its DPO, peak and memory steps on tiny shapes on the CPU)

Steps, each a JSON record (a failed step records its error and the run goes on):
  dpo_bf16  one DPO step of a tiny Llama in bf16 on the accelerator: finite, loss near log 2
  peak      the device's measured dense bf16 GEMM rate (8192³, fp32 accumulation, 16 products
            in one program so dispatch does not count), the denominator of the measured MFU
  dpo_step  DPO step time, tokens/s and MFU (against the spec sheet's and the measured peak) of
            a Qwen2-1.5B-shaped model (random weights, bf16 compute, fp32 params, 8 pairs x
            (192 + 64) tokens, shared prompt), attention by `jax.nn.dot_product_attention` on
            its cuDNN path and on the XLA path
  engine    the continuous-batching engine on a negatives-like workload (prompts ~128 tokens,
            replies of persona-chat lengths, top-p 0.9) at 64, 128 and 256 slots: useful tok/s
  hf_generate  the peer on the same workload: HF `generate` in PyTorch (bf16, on the GPU) in
            static batches of 64 and 256 length-sorted prompts
  static    our static sampler on the same workload, batches of 64 and 256 length-sorted
            prompts, each decoding to its longest budget (what the engine replaced)
  dnli      Dialogue-NLI-shaped scoring in fp32 (prompts of 160-255 tokens, 33 candidates of
            4-24 tokens): candidates/s of ours (the eval stage's cached prompt with its candidates in
            short rows; packed shared-prompt rows; one row per candidate) vs
            an HF PyTorch scorer that reuses the prompt's KV cache (bench/bench_engine.py's
            peer), and the largest score difference between ours and HF's
  ratios    the engine-issue targets from the steps above (engine / static and engine / HF
            at equal batch, cached / full rows and cached / HF-KV)
  parity    tests/test_models_hf_parity.py on the accelerator (HF PyTorch logits on the CPU);
            last, so a slow test run cannot cost the timings
  memory    the DPO step's peak device memory against `pdpo_jax.memory`'s prediction
Writes $OUT/gpu_check.json (or --out) after every step, and prints one summary line.
--steps a,b,... runs those steps only (e.g. `--steps engine,static,hf_generate,dnli,ratios`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True, eos_token_id=151643)
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, eos_token_id=0)
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16, for MFU


def _timed(fn, reps: int) -> list[float]:
    import jax
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def _second_call(run) -> tuple[float, object]:
    """(seconds, result) of run's second call: the first compiles and warms caches."""
    run()
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def _arch(args) -> dict:
    return TINY if args.smoke else QWEN2_1_5B


def _random_model(args, dtype: str = "float32"):
    """The check's model (TINY with --smoke, else the Qwen2-1.5B shape), random weights, params
    and compute in `dtype`."""
    from pdpo_jax.models import config_from_hf
    from pdpo_jax.models.families import build_model
    return build_model(config_from_hf(_arch(args)).replace(dtype=dtype, param_dtype=dtype))


def step_parity(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           "tests/test_models_hf_parity.py"]
    env = dict(os.environ, XLA_FLAGS="")  # the accelerator's own devices, not 8 fake CPUs
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    return dict(passed=p.returncode == 0, tail=p.stdout[-600:])


def _dpo_setup(arch: dict, pairs: int, prompt: int, reply: int, attention: str | None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pdpo_jax import sharding as shd
    from pdpo_jax.config import OptimizerConfig
    from pdpo_jax.models import config_from_hf
    from pdpo_jax.models.layers import frozen_forward_params
    from pdpo_jax.train import optim, state as st
    from pdpo_jax.train.steps import DpoObjective, make_dpo_step
    cfg = config_from_hf(arch).replace(dtype="bfloat16", param_dtype="float32",
                                       attn_implementation=attention)
    mesh = shd.make_mesh(data=1, fsdp=-1, tensor=1)
    graphdef, params = st.init_params(cfg, mesh, seed=0)
    tx, lr = optim.make_optimizer(OptimizerConfig(lr=1e-6), 100)
    ref = frozen_forward_params(__import__("flax").nnx.merge(graphdef, params))
    state, state_sh = st.create_state(params, tx, mesh)
    step = st.jit_dpo_step(make_dpo_step(graphdef, tx, lr, DpoObjective(), window=reply,
                                         share_prompt=True), state_sh, mesh)
    rng = np.random.default_rng(0)
    T = prompt + reply
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(1, cfg.vocab_size, (1, pairs, T)).astype(np.int32)
        tokens[..., prompt:] = rng.integers(1, cfg.vocab_size, (1, pairs, reply))
        loss = np.zeros((1, pairs, T), bool)
        loss[..., prompt:] = True
        batch |= {f"{side}_tokens": tokens, f"{side}_positions": np.broadcast_to(np.arange(T), (1, pairs, T)).astype(np.int32),
                  f"{side}_attention_mask": np.ones((1, pairs, T), bool), f"{side}_loss_mask": loss}
    batch["rejected_tokens"][..., :prompt] = batch["chosen_tokens"][..., :prompt]
    return cfg, step, state, ref, st.shard_batch(batch, mesh), jnp


def step_dpo_bf16(args) -> dict:
    import math
    cfg, step, state, ref, batch, _ = _dpo_setup(TINY, 4, 24, 8, None)
    state, metrics = step(state, ref, batch)
    loss = float(metrics["loss"])
    return dict(finite=bool(metrics["finite"]), loss=loss, ok=abs(loss - math.log(2)) < 0.05)


def step_peak(args) -> dict:
    import jax
    import jax.numpy as jnp
    n, reps = (256, 4) if args.smoke else (8192, 16)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(jnp.bfloat16)

    @jax.jit
    def products(a):  # each product feeds the next, so none is skipped or fused away
        def body(_, x):
            y = jnp.dot(x, a, preferred_element_type=jnp.float32)
            return (y * (1.0 / n ** 0.5)).astype(jnp.bfloat16)
        return jax.lax.fori_loop(0, reps, body, a)
    jax.block_until_ready(products(a))
    best = min(_timed(lambda: products(a), 5))
    return dict(n=n, products=reps, bf16_tflops=2.0 * n ** 3 * reps / best / 1e12)


def step_dpo(args, peak_tflops: float | None = None) -> dict:
    import gc
    out = {}
    for attention in ("cudnn", "xla"):
        try:
            out[attention] = _time_dpo(args, attention, peak_tflops)
        except Exception as e:  # cuDNN attention is GPU-only: record and go on
            out[attention] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        gc.collect()  # the first run's state is gone before the second is built
    return out


def dpo_step_flops(cfg, params: int, pairs: int, prompt: int, reply: int) -> int:
    """Matmul FLOPs of one shared-prompt DPO step: policy forward + backward (6 per weight and
    token) and reference forward (2); every token through the trunk (the prompt once for both
    replies), only the replies through the LM head; the embedding lookup is no matmul, and
    attention's own T² products are left out (under 3% at 256 tokens)."""
    head = cfg.vocab_size * cfg.d_model
    trunk = params - head * (1 if cfg.tie_embeddings else 2)
    return 8 * pairs * (trunk * (prompt + 2 * reply) + head * 2 * reply)


def _time_dpo(args, attention: str, peak_tflops: float | None) -> dict:
    import jax
    arch, pairs, prompt, reply = (TINY, 8, 24, 8) if args.smoke else (QWEN2_1_5B, 8, 192, 64)
    cfg, step, state, ref, batch, _ = _dpo_setup(arch, pairs, prompt, reply, attention)
    start = time.perf_counter()
    state, metrics = step(state, ref, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], ref, batch)
        return m
    times = sorted(_timed(one, 3 if args.smoke else 10))
    ms = times[len(times) // 2] * 1e3
    n = sum(x.size for x in jax.tree.leaves(holder["s"].params))
    tokens = 2 * pairs * (prompt + reply)  # the work asked for (chosen + rejected)
    flops = dpo_step_flops(cfg, n, pairs, prompt, reply)
    kind = str(jax.devices()[0].device_kind)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in kind), None)
    achieved = flops / (ms / 1e3)
    return dict(ms_per_step=ms, tokens_per_s=tokens / ms * 1e3, compile_s=compile_s, params=n,
                flops=flops, tflops=achieved / 1e12, mfu=achieved / (peak * 1e12) if peak else None,
                mfu_measured_peak=achieved / (peak_tflops * 1e12) if peak_tflops else None,
                peak_bytes=_peak_bytes())


def _peak_bytes() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def step_engine(args) -> dict:
    import numpy as np
    from pdpo_jax.sampling import SamplingConfig
    from pdpo_jax.sampling.engine import Engine, Request
    model = _random_model(args, "bfloat16")
    prompts, budgets = _negatives_workload(args)
    out = {}
    for slots in ((8, 16) if args.smoke else (64, 128, 256)):
        engine = Engine(model, SamplingConfig(48, top_p=0.9), slots=slots)

        def run():
            scheduler = engine.scheduler(cache_len=160 + 48 + 32)
            for k, (p, b) in enumerate(zip(prompts, budgets)):
                scheduler.submit(Request(p, int(b), example_id=k, top_p=0.9))
            while scheduler.busy:
                scheduler.step()
            return scheduler
        seconds, scheduler = _second_call(run)
        out[f"slots_{slots}"] = dict(seconds=seconds, useful_tok_s=sum(budgets) / seconds,
                                     busy=scheduler.useful_steps / max(scheduler.slot_steps, 1))
    return out


def _negatives_workload(args) -> tuple[list[list[int]], list[int]]:
    """Prompts of 96-159 tokens and reply budgets of persona-chat lengths (~13 tokens, <= 48)."""
    import numpy as np
    rng = np.random.default_rng(0)
    n_prompts = 64 if args.smoke else 1024
    prompts = [rng.integers(1, 400, rng.integers(96, 160)).tolist() for _ in range(n_prompts)]
    budgets = np.clip(rng.gamma(3.0, 4.5, n_prompts).astype(int) + 1, 2, 48).tolist()
    return prompts, budgets


def step_hf_generate(args) -> dict:
    """The peer: HF `generate` (PyTorch, bf16, its default KV cache) on the engine's workload in
    static batches of prompts sorted by length; a batch decodes to its longest budget (random
    weights never stop early), so useful tokens are the budgets, as for the engine."""
    import torch
    import transformers
    from pdpo_jax.data.batches import left_pad
    arch = _arch(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to(device).eval()
    prompts, budgets = _negatives_workload(args)
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    out = {}
    for batch in ((8, 16) if args.smoke else (64, 256)):
        def run():
            for lo in range(0, len(order), batch):
                chunk = order[lo:lo + batch]
                tokens, mask = left_pad([prompts[k] for k in chunk], 0)
                budget = max(budgets[k] for k in chunk)
                with torch.inference_mode():
                    model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=device),
                                   attention_mask=torch.as_tensor(mask, dtype=torch.long, device=device),
                                   do_sample=True, top_p=0.9, top_k=0, temperature=1.0,
                                   max_new_tokens=budget, min_new_tokens=budget, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
        seconds, _ = _second_call(run)  # the first call warms kernels and the allocator
        out[f"batch_{batch}"] = dict(seconds=seconds, useful_tok_s=sum(budgets) / seconds)
    return out


def step_static(args) -> dict:
    """Our static sampler (one `Sampler.generate` per batch of length-sorted prompts, decoding to
    the batch's longest budget) on the engine's workload: the engine's own baseline."""
    from pdpo_jax.sampling import Sampler, SamplingConfig
    model = _random_model(args, "bfloat16")
    sampler = Sampler(model, SamplingConfig(48, top_p=0.9))
    prompts, budgets = _negatives_workload(args)
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    out = {}
    for batch in ((32,) if args.smoke else (64, 256)):  # smoke: 2 batches, a few compiles
        def run():
            lengths = []
            for lo in range(0, len(order), batch):
                chunk = order[lo:lo + batch]
                filled = chunk + [chunk[0]] * (batch - len(chunk))  # one shape per batch size
                got = sampler.generate([prompts[k] for k in filled], example_ids=filled,
                                       cfg=SamplingConfig(max(budgets[k] for k in chunk), top_p=0.9))
                lengths += [min(int(got.lengths[j]), budgets[k]) for j, k in enumerate(chunk)]
            return lengths
        seconds, lengths = _second_call(run)
        out[f"batch_{batch}"] = dict(seconds=seconds, useful_tok_s=sum(lengths) / seconds,
                                     useful_tokens=sum(lengths))
    return out


def _dnli_workload(args):
    """Examples shaped like Dialogue-NLI's: a prompt of 160-255 tokens, 33 candidates of 4-24."""
    import numpy as np
    rng = np.random.default_rng(1)
    n = 4 if args.smoke else 96
    vocab = _arch(args)["vocab_size"]
    return [(rng.integers(1, vocab, rng.integers(160, 256)),
             [rng.integers(1, vocab, rng.integers(4, 25)) for _ in range(33)]) for _ in range(n)]


def step_dnli(args) -> dict:
    """fp32 scoring under the eval stage's matmul precision: ours in each layout (the eval
    stage's 'cached' first), then the HF KV-reusing peer on the same device and weights;
    candidates/s of each and max |ours - HF|."""
    import numpy as np
    import torch
    import transformers
    from flax import nnx
    from bench_engine import _hf_kv_scores, jax_dnli_scorer
    from pdpo_jax.models import save_pretrained
    model = _random_model(args)  # fp32
    graphdef, params = nnx.split(model)
    examples = _dnli_workload(args)
    n = sum(len(c) for _, c in examples)
    out, scores = {}, {}
    for kind, batch in (("cached", 4 if args.smoke else 32), ("packed", 4 if args.smoke else 32),
                        ("full", 33)):
        seconds, scores[kind] = _second_call(jax_dnli_scorer(graphdef, params, examples, kind, batch))
        out[kind] = dict(seconds=seconds, candidates_per_s=n / seconds, batch=batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:  # the same weights
        save_pretrained(model, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf = hf.to(device).eval()

    def run_hf():
        with torch.inference_mode():
            return [x for p, c in examples
                    for x in _hf_kv_scores(hf, p.tolist(), [t.tolist() for t in c])]
    seconds, scores["hf_kv"] = _second_call(run_hf)
    out["hf_kv"] = dict(seconds=seconds, candidates_per_s=n / seconds)
    out |= dict(examples=len(examples), candidates=n,
                max_abs_diff_vs_hf=float(np.max(np.abs(np.subtract(scores["cached"], scores["hf_kv"])))),
                max_abs_diff_full=float(np.max(np.abs(np.subtract(scores["cached"], scores["full"])))),
                max_abs_diff_packed=float(np.max(np.abs(np.subtract(scores["cached"], scores["packed"])))),
                max_abs_score=float(np.max(np.abs(scores["hf_kv"]))))
    return out


def step_ratios(result: dict) -> dict:
    """The engine issue's ratios from the steps' records (None where a step is missing)."""
    def rate(step, key, field):
        return (result.get(step) or {}).get(key, {}).get(field)

    def ratio(a, b):
        return a / b if a and b else None
    out = {}
    sizes = sorted(int(k.split("_")[1]) for k in (result.get("engine") or {}) if k.startswith("slots_"))
    for slots in sizes:
        engine = rate("engine", f"slots_{slots}", "useful_tok_s")
        out[f"engine_vs_static_{slots}"] = ratio(engine, rate("static", f"batch_{slots}", "useful_tok_s"))
        out[f"engine_vs_hf_{slots}"] = ratio(engine, rate("hf_generate", f"batch_{slots}", "useful_tok_s"))
    cached = rate("dnli", "cached", "candidates_per_s")
    out["dnli_vs_full"] = ratio(cached, rate("dnli", "full", "candidates_per_s"))
    out["dnli_vs_hf_kv"] = ratio(cached, rate("dnli", "hf_kv", "candidates_per_s"))
    out["dnli_cached_vs_packed"] = ratio(cached, rate("dnli", "packed", "candidates_per_s"))
    return out


def step_memory(args, dpo: dict) -> dict:
    import jax
    from pdpo_jax.config import load_config
    from pdpo_jax.memory import MeshShape, plan
    arch = _arch(args)
    pairs, total = (8, 32) if args.smoke else (8, 256)
    cfg = load_config(None, (f"model.architecture={json.dumps(arch)}", "model.dtype=bfloat16",
                             f"dpo.batch_size={pairs}", f"data.max_total_tokens={total}",
                             f"data.buckets=[{total}]", f"data.max_response_tokens={total // 4}"))
    predicted = plan(cfg, MeshShape.resolve(1, -1, 1, num_devices=jax.device_count()), "dpo",
                     device_memory=80 * 2**30).total("train")
    # the first run's: the device's peak_bytes_in_use only grows over the process
    measured = next((r["peak_bytes"] for r in (dpo.get("cudnn"), dpo.get("xla"))
                     if r and r.get("peak_bytes")), None)
    return dict(predicted_bytes=predicted, measured_peak_bytes=measured,
                ratio=measured / predicted if measured else None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any backend")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    args = p.parse_args()
    import jax
    result = dict(backend=jax.default_backend(), devices=[str(d.device_kind) for d in jax.devices()],
                  jax=jax.__version__, smoke=args.smoke)
    steps = [("dpo_bf16", step_dpo_bf16), ("peak", step_peak),
             ("dpo_step", lambda a: step_dpo(a, result.get("peak", {}).get("bf16_tflops"))),
             ("engine", step_engine), ("hf_generate", step_hf_generate), ("static", step_static),
             ("dnli", step_dnli), ("ratios", lambda a: step_ratios(result)),
             ("memory", lambda a: step_memory(a, result.get("dpo_step", {})))]
    if not args.skip_parity:
        steps.insert(8, ("parity", step_parity))
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in steps} - {"parity"})
        if unknown:
            p.error(f"--steps: unknown {', '.join(unknown)}; the steps are "
                    f"{', '.join(name for name, _ in steps)}, parity")
        steps = [(name, fn) for name, fn in steps if name in wanted]
    os.makedirs(args.out, exist_ok=True)
    for name, fn in steps:
        start = time.perf_counter()
        try:
            result[name] = fn(args)
        except Exception as e:
            result[name] = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu_check] {name}: {json.dumps(result[name])[:400]}", file=sys.stderr, flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # a timeout keeps the rest
            json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k in ("backend", "devices", "smoke")}))


if __name__ == "__main__":
    main()
