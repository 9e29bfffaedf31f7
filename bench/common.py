"""What the DPO benchmarks share: model shapes, FLOP counts, the synthetic batch, and the
measurement record (load, CPU steal, other processes' CPU, allocator, peak RSS).

No heavy imports here: every worker imports this first (it also sets the offline env vars
before transformers/trl can be imported), then its own framework.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1",
                     "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false",
                     "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

# Model shapes (HF LlamaConfig names). "anchor" = ../shared/anchors/common.py, so the peer
# numbers there and ours describe the same function.
MODELS = {
    "anchor": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6,
                   rope_theta=1e4, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True),
}
RESPONSE = 32  # response tokens per sequence; the prompt fills the rest of seq_len
BETA = 0.5
LR = 1e-5
FIRST_WORD_ID = 4  # ids 0..3 are <pad> <s> </s> <unk> in the trl tokenizer


def param_counts(name: str) -> dict:
    """Parameter counts; n_flops = non-embedding params + lm_head (the anchors' N); layer_kv and
    layer_queries: one layer's k,v and q,o + MLP matmul weights."""
    m = MODELS[name]
    d, f, L, V = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    hd, nq, nk = m["head_dim"], m["num_attention_heads"], m["num_key_value_heads"]
    kv = d * nk * hd * 2
    queries = d * nq * hd * 2 + 3 * d * f  # q,o + mlp: the matmuls a layer runs per query
    per_layer = queries + kv + 2 * d  # + norms
    blocks = L * per_layer + d  # + final norm
    embed = lm_head = V * d  # tied: the same matrix, still one V×D matmul per scored position
    total = blocks + embed + (0 if m["tie_word_embeddings"] else lm_head)
    return dict(blocks=blocks, embed=embed, lm_head=lm_head, total=total, n_flops=blocks + lm_head,
                # what runs at scored columns only: + the layer's 2 norms and the final norm
                last_layer_queries=queries + 3 * d,
                layer_kv=kv, layer_queries=queries)  # one layer's matmul weights, no norms


def tokens_per_step(pairs: int, seq_len: int) -> int:
    """Tokens of one step as the anchors count them: chosen + rejected = 2 × pairs × seq_len.

    The policy (forward + backward, 6N per token) and the reference (forward, 2N per token) both
    read these same tokens, hence 8·N·tokens FLOPs; the sequences pushed through a model per
    step are twice as many (`sequence_tokens_per_step`)."""
    return 2 * pairs * seq_len


def step_flops(name: str, pairs: int, seq_len: int, window: int | None,
               shared: bool = False, last_layer_selected: bool = False) -> dict:
    """model = 8·N·tokens (6N policy fwd+bwd + 2N reference fwd); executed = what a step with
    the LM head on `window` response positions only actually multiplies (the anchors credit
    their lmhead_resp rows with this), and with `shared` (pdpo_jax dpo.share_prompt) the blocks
    on prompt + 2 responses per pair instead of 2 × (prompt + response); with
    `last_layer_selected` (pdpo_jax's `hidden_states(select_BQ=)`) the last layer's queries,
    output projection, MLP and final norm on the scored positions only. Causal attention
    matmuls are not counted (as anchors)."""
    pc = param_counts(name)
    tok = tokens_per_step(pairs, seq_len)
    model = 8 * pc["n_flops"] * tok
    block_tok = pairs * (seq_len + RESPONSE) if shared else tok
    scored = 2 * pairs * window if window is not None else 0
    executed = model if window is None else 8 * (pc["blocks"] * block_tok + pc["lm_head"] * scored)
    if window is not None and last_layer_selected:
        executed -= 8 * pc["last_layer_queries"] * (block_tok - scored)
    m = MODELS[name]
    # causal attention QKᵀ and PV over the full T×T square (as computed): 4·T·N·H per token and
    # layer forward; × 3 for the policy's forward + backward, + 1 for the reference
    attn = 4 * 4 * seq_len * m["num_attention_heads"] * m["head_dim"] * m["num_hidden_layers"] * tok
    return dict(model=model, executed=executed, attn_not_counted=attn, tokens=tok, n_flops=pc["n_flops"])


def preference_ids(seed: int, vocab: int, pairs: int, seq_len: int):
    """Random pairs sharing a prompt: (prompt [P, S-R], chosen [P, R], rejected [P, R]) int64."""
    import numpy as np
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(FIRST_WORD_ID, vocab, (pairs, n), dtype=np.int64)  # noqa: E731
    return draw(seq_len - RESPONSE), draw(RESPONSE), draw(RESPONSE)


# ---------------------------------------------------------------------------------------------
# Measurement


def allocator() -> str:
    pre = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in pre:
            return name
    return "glibc"


def peak_rss_mib() -> float:
    """Peak RSS of the whole process so far (imports, model build, compilation, steps)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


_RSS_RESET = False


def reset_peak_rss() -> None:
    """Restarts the kernel's peak-RSS counter (VmHWM) so that `steps_peak_rss_mib` covers only
    what follows: call it just before the first training step, after model building and (JAX)
    compilation. Linux ≥ 4.0 (`echo 5 > /proc/self/clear_refs`); elsewhere a no-op."""
    global _RSS_RESET
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _RSS_RESET = True
    except OSError:
        pass


def vm_hwm_mib() -> float | None:
    """VmHWM: peak RSS since the last `reset_peak_rss` (or process start)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def cpu_ticks() -> tuple[int, int, int]:
    """(total, busy, steal) jiffies of the whole machine."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    total = sum(f[:8])
    idle = f[3] + f[4]
    return total, total - idle - f[7], f[7]


class Meter:
    """Brackets a timed section: load average, CPU steal and the CPU other processes used.

    others_cpu_frac = (machine busy − this process's user+sys) / machine capacity over the
    section, so 0.3 means other processes took ~30 % of the cores while we were timing.
    """

    def __enter__(self):
        self.load_start = os.getloadavg()[0]
        self.ticks = cpu_ticks()
        self.own = sum(os.times()[:2])
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc):
        total, busy, steal = cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        d_total = max(1, total - self.ticks[0])
        own = (sum(os.times()[:2]) - self.own) * hz
        self.result = dict(
            load1_start=round(self.load_start, 2), load1_end=round(os.getloadavg()[0], 2),
            cpu_steal_frac=round((steal - self.ticks[2]) / d_total, 4),
            others_cpu_frac=round(max(0.0, (busy - self.ticks[1] - own) / d_total), 3),
            own_cpu_frac=round(own / d_total, 3),
            timed_wall_s=round(time.perf_counter() - self.wall, 2))
        return False


def call_seconds(fn, reps: int, warmup: int = 3) -> list[float]:
    """Seconds of `reps` calls of fn after `warmup` untimed ones, sorted (fastest first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)


def summarize(times: list[float]) -> dict:
    ts = sorted(times)
    return dict(median_s=statistics.median(ts), min_s=ts[0], max_s=ts[-1], n=len(ts),
                all_s=[round(t, 4) for t in times])


def host() -> dict:
    """The CPU (its name; family and model tell generations apart where the name does not: an
    "AMD EPYC" at family 25 model 17 is a Zen 4 (Genoa), at family 26 a Zen 5, whose fp32 FMA
    peak per cycle is twice Zen 4's), the cores we may use, Python and the environment
    variables that steer the kernels."""
    info = {}
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first CPU's block is enough
            info.setdefault(key.strip(), value.strip())
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("OMP_", "MKL_", "XLA_", "JAX_", "MALLOC_")) or k == "LD_PRELOAD"}
    return dict(cpu=info.get("model name", ""), cpu_family=info.get("cpu family"),
                cpu_model=info.get("model"), avx512f="avx512f" in info.get("flags", "").split(),
                cpus=len(os.sched_getaffinity(0)), python=platform.python_version(), env=env)


def finish(record: dict, times: list[float], first_s: float, peaks: dict | None = None) -> dict:
    """Adds steps/s, tokens/s, FLOPs, MFU (vs the peak of the same precision) and the host facts."""
    s = summarize(times)
    step_s = s["median_s"]
    fl = step_flops(record["model"], record["pairs"], record["seq_len"], record.get("window"),
                    record.get("share_prompt", False), record.get("last_layer_selected", False))
    record.update(step_time=s, step_ms=round(step_s * 1e3, 1), steps_per_s=1.0 / step_s,
                  tokens_per_step=fl["tokens"], tokens_per_s=fl["tokens"] / step_s,
                  sequence_tokens_per_step=2 * fl["tokens"],
                  first_step_s=round(first_s, 2), model_flops_per_step=fl["model"],
                  executed_flops_per_step=fl["executed"], attn_flops_not_counted=fl["attn_not_counted"],
                  n_flops_params=fl["n_flops"], executed_flops_per_s=fl["executed"] / step_s)
    peak = (peaks or {}).get("machine_bf16" if record["precision"] == "bf16" else "machine_fp32")
    if peak:
        record["peak_flops"] = peak
        record["mfu"] = fl["executed"] / step_s / peak  # what the step multiplies, as anchors
        record["mfu_model_flops"] = fl["model"] / step_s / peak  # 8·N·tokens credited
    return add_process_facts(record)


def add_process_facts(record: dict) -> dict:
    """The allocator, peak RSS (and the steps' alone after `reset_peak_rss`) and the host."""
    record.setdefault("allocator", allocator())
    record["peak_rss_mib"] = round(peak_rss_mib(), 1)
    hwm = vm_hwm_mib()
    if _RSS_RESET and hwm is not None:
        record["steps_peak_rss_mib"] = round(hwm, 1)  # the training steps alone (see reset_peak_rss)
    record["host"] = host()
    return record


def load_peaks(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def noise_line(noise: dict, unit: str = "rows") -> str:
    """The markdown sentence summing up a run's noise (see Meter and the benches' `noise`)."""
    return (f"Noise: max load1 {noise['max_load1']}, max CPU share of other processes while timing "
            f"{noise['max_others_cpu_frac']}; {unit} with others > 10 %: "
            f"{', '.join(noise['contaminated']) or 'none'}; failed: "
            f"{', '.join(noise['failed']) or 'none'}.")


def step_args(ap, *, model: bool = True, window: int | None = None) -> None:
    """The shape and timing flags every DPO-step worker shares (one copy, so the frameworks
    cannot drift onto different defaults); model=False for trl, which has the anchor only.
    `--all` always passes --window, so the per-worker default only matters when run alone."""
    if model:
        ap.add_argument("--model", choices=sorted(MODELS), default="anchor")
        ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
        ap.add_argument("--window", type=lambda s: None if s in ("none", "None", "0") else int(s),
                        default=window,
                        help="response positions through the LM head; 'none' = every position")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--peaks", default=None, help="peaks JSON written by matmul_peak.py")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    """One JSON line on stdout: the only thing a worker prints there."""
    print(json.dumps(record, sort_keys=True), flush=True)


def trainer_step_stamps():
    """(stamps, callback): a transformers TrainerCallback that appends perf_counter() at the first
    step's start and at every step's end, so the step times are the differences of `stamps`."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            stamps.append(time.perf_counter())

    return stamps, Timer()
