"""The PyTorch peers of bench_train.py on the same batches: a hand-written SFT / DPO step, and
trl's SFTTrainer / DPOTrainer, on SmolLM2-135M-Instruct (transformers, sdpa attention).

    .venv/bin/python bench/torch_train.py --framework torch|trl --task sft|dpo --precision fp32|bf16 --workload W

Hand-written (`--framework torch`), what a careful user writes: rows right-padded to the batch's
longest (dynamic padding), the backbone on every token, the LM head only at the positions that
predict a response token (gathered with the response mask: the lever trl's fused LM head pulls
on GPUs), fp32 cross-entropy / log-softmax, AdamW (torch defaults: foreach) with the config's
weight decay on what pdpo_jax decays (not norms) and global-norm clipping, bf16 = `torch.autocast("cpu", bfloat16)` around the
forwards (fp32 master weights and optimizer). DPO: chosen rows then rejected rows in one
policy forward (with grad) and one reference forward (`no_grad`, a frozen deep copy), sigmoid
loss (`torch_dpo.sigmoid_dpo_loss`), β from the config.

trl (opt-in: bench_train.py --peers trl-bf16,...; not part of the recorded runs): SFTTrainer with `padding_free=True` (trl flattens the batch into one row with
position_ids; transformers' sdpa mask keeps the records apart, `find_packed_sequence_indices`),
DPOTrainer with `padding_free=True` requested (trl 1.16 ignores it and pads: recorded as
`padding_free_effective`). Offline as trl_dpo.py: model, reference and tokenizer passed in.
Both get the workload's token ids (SFT: `input_ids` + `labels`, -100 on the prompt; DPO:
`prompt_ids` / `chosen_ids` / `rejected_ids`, trl's tokenizing step bypassed) in plan order
(`train_sampling_strategy="sequential"`), so trl step k trains on batch k. Step time = gap
between consecutive `on_step_end` callbacks (collation, forwards, backward, optimizer,
bookkeeping). fp32: `bf16=False`; bf16: `bf16=True` (autocast); no gradient checkpointing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (offline env vars before transformers/trl)
import train_workload as tw  # noqa: E402
from bench_train import worker_args  # noqa: E402
from torch_dpo import sigmoid_dpo_loss  # noqa: E402


def load_model():
    """SmolLM2-135M-Instruct in fp32 (master weights; bf16 rows autocast), sdpa attention."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tw.smollm2_dir(), dtype=torch.float32,
                                                attn_implementation="sdpa")


def padded(rows: list[tuple[list[int], int]], pad_id: int):
    """ids, attention mask and target mask (True where the token is a response token) [n, T],
    right-padded to the longest row."""
    import torch
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    resp = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (row, p) in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row)
        attn[i, :len(row)] = 1
        resp[i, p:len(row)] = True
    return ids, attn, resp


def response_logps(model, ids, attn, resp):
    """Log-probs of the response tokens [n_response] and each one's row: the backbone on every
    token, the LM head at the positions that predict a response token only."""
    import torch
    h = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    sel = resp[:, 1:]  # position t predicts token t + 1
    logits = model.lm_head(h[:, :-1][sel]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1)
    return logp, sel.nonzero()[:, 0]


def optimizer(policy, lr: float, weight_decay: float):
    """AdamW (torch defaults: foreach, betas 0.9/0.999, eps 1e-8) decaying what pdpo_jax's
    `make_optimizer` decays: matrices and embeddings, not norms or biases."""
    import torch
    named = list(policy.named_parameters())
    decay = [p for n, p in named if "norm" not in n and "bias" not in n]
    rest = [p for n, p in named if "norm" in n or "bias" in n]
    return torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                              dict(params=rest, weight_decay=0.0)], lr=lr)


def batch_loss(policy, ref, batch, task: str, beta: float):
    """The loss of one padded batch (`padded`): SFT = mean NLL over every response token of the
    batch (pdpo_jax's token-normalised SFT loss); DPO = the sigmoid loss over the pairs, chosen
    rows first, the reference's sums under `no_grad`."""
    import torch
    ids, attn, resp = batch
    if task == "sft":
        logp, _ = response_logps(policy, ids, attn, resp)
        return -logp.mean()
    B = ids.shape[0] // 2
    with torch.no_grad():
        lp, row = response_logps(ref, ids, attn, resp)
        ref_sums = torch.zeros(2 * B).index_add(0, row, lp.float())
    lp, row = response_logps(policy, ids, attn, resp)
    sums = torch.zeros(2 * B).index_add(0, row, lp.float())
    return sigmoid_dpo_loss(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], beta)


def make_step(policy, ref, opt, task: str, precision: str, beta: float, clip_norm: float):
    """step(batch) -> loss before the update: forwards (under bf16 autocast for "bf16"),
    backward, global-norm clipping, AdamW."""
    import torch
    amp = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16"
           else contextlib.nullcontext)

    def step(batch):
        with amp():
            loss = batch_loss(policy, ref, batch, task, beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def run_torch(args, w: dict) -> dict:
    import torch
    s, task = w["settings"], args.task
    plan = w[f"{task}_plan"][:args.warmup + args.steps]
    policy = load_model().train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if task == "dpo" else None
    opt = optimizer(policy, s["sft_lr"] if task == "sft" else s["dpo_lr"], s["weight_decay"])
    batches = [padded(tw.dynamic_rows(w, task, row), w["pad_id"]) for row in plan]
    train_step = make_step(policy, ref, opt, task, args.precision, s["beta"], s["clip_norm"])

    def step(i):
        return train_step(batches[i])

    common.reset_peak_rss()
    first_s, times = 0.0, []
    for i in range(args.warmup):
        t0 = time.perf_counter()
        loss = step(i)
        first_s = first_s or time.perf_counter() - t0
    with common.Meter() as meter:
        for i in range(args.warmup, len(plan)):
            t0 = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t0)
    steps = [torch_step_shape(w, task, plan[i], batches[i], head="response")
             for i in range(args.warmup, len(plan))]
    record = dict(bench="train", framework="torch", label=f"torch-{task}-{args.precision}", task=task,
                  layout="dynamic", precision=args.precision, lm_head="response positions",
                  last_layer_selected=False, compile_s=None, final_loss=loss,
                  torch_version=torch.__version__,
                  threads=[torch.get_num_threads(), torch.get_num_interop_threads()], **meter.result)
    return tw.finish(record, times, steps, first_s, common.load_peaks(args.peaks))


def torch_step_shape(w, task, plan_row, batch, head: str) -> dict:
    """Token slots (rows × the longest), real tokens, LM-head positions (`head`: "response" =
    the response tokens only, "all" = every position but the last of each row)."""
    ids, attn, resp = batch
    n, T = ids.shape
    heads = int(resp[:, 1:].sum()) if head == "response" else n * (T - 1)
    return dict(slots=n * T, real=int(attn.sum()), head=heads, useful=tw.useful_tokens(w, task, plan_row))


# ---------------------------------------------------------------------------------------------
# trl


def run_trl(args, w: dict) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    s, task = w["settings"], args.task
    plan = w[f"{task}_plan"][:args.warmup + args.steps]
    order = [i for row in plan for i in row]
    B = s[f"{task}_batch"]
    model = load_model()
    tok = AutoTokenizer.from_pretrained(tw.smollm2_dir())
    scratch = tempfile.TemporaryDirectory(prefix="bench-trl-")  # removed when the worker exits
    common_cfg = dict(output_dir=scratch.name, per_device_train_batch_size=B, max_steps=len(plan),
                      learning_rate=s["sft_lr"] if task == "sft" else s["dpo_lr"],
                      weight_decay=s["weight_decay"], max_grad_norm=s["clip_norm"],
                      lr_scheduler_type="constant", use_cpu=True, report_to="none", save_strategy="no",
                      logging_steps=10_000, disable_tqdm=True, seed=0, dataloader_pin_memory=False,
                      train_sampling_strategy="sequential", bf16=args.precision == "bf16",
                      gradient_checkpointing=False, padding_free=True)
    stamps, timer = common.trainer_step_stamps()

    if task == "sft":
        rows = [w["sft"][i] for i in order]
        data = Dataset.from_dict({"input_ids": [e["p"] + e["r"] for e in rows],
                                  "labels": [[-100] * len(e["p"]) + e["r"] for e in rows]})
        cfg = trl.SFTConfig(max_length=None, **common_cfg)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                 callbacks=[timer])
        padding_free = bool(trainer.padding_free)
    else:
        rows = [w["dpo"][i] for i in order]
        data = Dataset.from_dict({"prompt_ids": [e["p"] for e in rows], "chosen_ids": [e["c"] for e in rows],
                                  "rejected_ids": [e["r"] for e in rows]})

        class IdsDPOTrainer(trl.DPOTrainer):  # the ids are given: skip trl's text tokenizing
            def _prepare_dataset(self, dataset, *a, **kw):
                return dataset

        cfg = trl.DPOConfig(beta=s["beta"], loss_type=["sigmoid"], max_length=None, **common_cfg)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        trainer = IdsDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data,
                                processing_class=tok, callbacks=[timer])
        padding_free = bool(trainer.padding_free)
    batches = [trainer.data_collator([trainer.train_dataset[j] for j in range(k * B, (k + 1) * B)])
               for k in range(len(plan))]
    steps = [trl_step_shape(w, task, plan[k], batches[k]) for k in range(len(plan))]
    common.reset_peak_rss()
    with common.Meter() as meter:  # covers the warm-up steps too: the trainer runs them in one call
        trainer.train()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    record = dict(bench="train", framework="trl", label=f"trl-{task}-{args.precision}", task=task,
                  layout="padding-free" if padding_free else "dynamic", precision=args.precision,
                  padding_free_requested=True, padding_free_effective=padding_free,
                  lm_head="every position (trl's fused LM head scores all positions off Triton)",
                  last_layer_selected=False, compile_s=None, bf16=bool(cfg.bf16),
                  gradient_checkpointing=bool(cfg.gradient_checkpointing), optim=str(cfg.optim),
                  trl_version=trl.__version__, transformers_version=transformers.__version__,
                  torch_version=torch.__version__,
                  threads=[torch.get_num_threads(), torch.get_num_interop_threads()], **meter.result)
    return tw.finish(record, gaps[args.warmup:], steps[args.warmup:], gaps[0], common.load_peaks(args.peaks))


def trl_step_shape(w, task, plan_row, batch) -> dict:
    """What trl runs for one collated batch; checks it holds the plan's tokens."""
    ids = batch["input_ids"]
    n, T = ids.shape
    useful = tw.useful_tokens(w, task, plan_row)
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
    else:  # padding-free: one row of every record back to back
        real = n * T
    expect = useful if task == "sft" else useful + sum(len(w[task][i]["p"]) for i in plan_row if i >= 0)
    if real != expect:
        raise RuntimeError(f"trl collated {real} real tokens for batch {plan_row}; expected {expect}")
    return dict(slots=n * T, real=real, head=n * (T - 1), useful=useful)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=["torch", "trl"], default="torch")
    worker_args(ap)
    args = ap.parse_args()
    w = tw.load(args.workload)
    record = run_torch(args, w) if args.framework == "torch" else run_trl(args, w)
    common.log(f"[{record['label']}] {record['step_ms']} ms/step, {record['useful_tok_s']:.0f} useful tok/s, "
               f"rss {record['peak_rss_mib']} MiB")
    common.emit(record)


if __name__ == "__main__":
    main()
