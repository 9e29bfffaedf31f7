"""Hand-written PyTorch DPO step on the same Llama: "what a user writes".

    .venv/bin/python bench/torch_dpo.py [--model anchor] [--precision fp32|bf16] [--window none|32]

One step = policy forward on [chosen; rejected] with grad, reference forward under no_grad,
per-token log-probs, sigmoid DPO loss (β 0.5), backward, AdamW (torch defaults). The model
is transformers' `LlamaForCausalLM` built from a config (random weights, sdpa attention).
`--window none` (the default, what a user writes) takes log_softmax over the full logits of
every position; `--window 32` pushes only the 32 positions that predict the response through
lm_head, the same lever as pdpo_jax's window. bf16 = `torch.autocast("cpu", bfloat16)`
around both forwards (fp32 master weights and optimizer). Prints ONE json line on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (offline env vars before transformers)


def build_model(name: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    m = dict(common.MODELS[name])
    theta = m.pop("rope_theta")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**m, max_position_embeddings=2048, hidden_act="silu", attention_bias=False,
                      mlp_bias=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": theta})
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float()


def sigmoid_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Mean sigmoid DPO loss over pairs, from per-pair log-prob sums [B] (bench_train's
    hand-written step uses it too)."""
    import torch.nn.functional as F
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def torch_batch(seed: int, vocab: int, pairs: int, seq_len: int):
    """ids [2·pairs, T] (chosen rows then rejected rows) and the response mask."""
    import numpy as np
    import torch
    prompt, chosen, rejected = common.preference_ids(seed, vocab, pairs, seq_len)
    ids = np.concatenate([np.concatenate([prompt, chosen], 1), np.concatenate([prompt, rejected], 1)])
    mask = np.zeros_like(ids)
    mask[:, -common.RESPONSE:] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.step_args(ap)
    args = ap.parse_args()

    import torch

    policy = build_model(args.model).train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=common.LR)
    vocab = common.MODELS[args.model]["vocab_size"]
    batches = [torch_batch(seed, vocab, args.pairs, args.seq_len) for seed in range(2)]
    B, R = args.pairs, common.RESPONSE
    amp = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16"
           else contextlib.nullcontext)

    def seq_logps(model, ids, mask):
        if args.window is None:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            targets, mask = ids[:, 1:], mask[:, 1:]
        else:
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            logits = model.lm_head(h[:, -args.window - 1:-1])  # positions predicting the response
            targets, mask = ids[:, -args.window:], mask[:, -args.window:]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(-1)

    def step(i):
        ids, mask = batches[i % 2]
        opt.zero_grad(set_to_none=True)
        with amp():
            with torch.no_grad():
                ref_lp = seq_logps(ref, ids, mask)
            pol_lp = seq_logps(policy, ids, mask)
        loss = sigmoid_dpo_loss(pol_lp[:B], pol_lp[B:], ref_lp[:B], ref_lp[B:], common.BETA)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert args.window is None or args.window == R, "the synthetic responses are exactly 32 tokens"
    first_s = 0.0
    common.reset_peak_rss()
    for i in range(args.warmup):
        t0 = time.perf_counter()
        loss = step(i)
        first_s = first_s or time.perf_counter() - t0
    times = []
    with common.Meter() as meter:
        for i in range(args.steps):
            t0 = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t0)
    label = f"torch-{args.precision}-" + ("full" if args.window is None else f"win{args.window}")
    record = dict(bench="dpo", framework="torch", label=label, model=args.model,
                  precision=args.precision, window=args.window, pairs=args.pairs,
                  seq_len=args.seq_len, compile_s=None, final_loss=loss,
                  torch_version=torch.__version__, threads=[torch.get_num_threads(),
                                                             torch.get_num_interop_threads()],
                  **meter.result)
    record = common.finish(record, times, first_s, common.load_peaks(args.peaks))
    common.log(f"[{label}] {args.model} pairs={args.pairs} T={args.seq_len}: {record['step_ms']} ms/step, "
               f"{record['tokens_per_s']:.0f} tok/s, rss {record['peak_rss_mib']} MiB")
    common.emit(record)


if __name__ == "__main__":
    main()
