"""The real persona-chat workload of bench_train.py: SmolLM2-encoded SFT records and DPO pairs,
the trainer's batch plan, and what every layout pads and executes (FLOP counts).

Built once by the parent (`build`, a JSON file); every worker reads it, so every framework
trains on the same token ids in the same batches. No jax or torch import at module level.
"""
from __future__ import annotations

import json
import os

import common

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "smollm2_135m_shuffle.yaml")
MODEL = "smollm2-135m"  # common.MODELS shapes of the real checkpoint


def smollm2_dir() -> str:
    return os.path.expanduser(os.environ.get("PDPO_SMOLLM2_DIR")
                              or "~/.cache/pdpo-models/smollm2-135m-instruct")


def settings(config: str = CONFIG) -> dict:
    """What the smollm2 config sets that the workload and the steps follow."""
    from pdpo_jax.config import load_config
    cfg = load_config(config)
    d, m = cfg.data, cfg.model
    return dict(config=os.path.relpath(config, os.path.dirname(os.path.dirname(CONFIG))),
                template=d.template, max_total_tokens=d.max_total_tokens, truncation=d.truncation,
                max_response_tokens=d.max_response_tokens, buckets=list(d.buckets),
                max_train_records=d.max_train_records, seed=cfg.run.seed,
                sft_batch=cfg.sft.batch_size, dpo_batch=cfg.dpo.batch_size,
                sft_pack_length=d.packed_row_length(False), dpo_pack_length=d.packed_row_length(True),
                sft_lr=cfg.sft.optimizer.lr, dpo_lr=cfg.dpo.optimizer.lr, beta=cfg.dpo.beta,
                share_prompt=cfg.dpo.share_prompt, precompute_ref=cfg.dpo.precompute_ref,
                dtype=m.dtype, param_dtype=m.param_dtype, unroll_layers=m.unroll_layers,
                remat=m.remat, weight_decay=cfg.sft.optimizer.weight_decay,
                clip_norm=cfg.sft.optimizer.clip_norm)


def build(path: str, n_batches: int, config: str = CONFIG) -> dict:
    """Encodes the records as the config's SFT and DPO stages do (the run's drawn subset of the
    embedded train split, `data.truncation`), takes the first `n_batches` batches of the
    trainer's epoch-0 plan (seeded, length-bucketed), writes the JSON."""
    import numpy as np
    import transformers

    from pdpo_jax import data as pdata
    s = settings(config)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir())
    split = pdata.read_turns(pdata.default_paths().train)
    # the records a run of the config trains on (RunContext.dialogues("train"))
    records = [split[i] for i in pdata.sample_indices(len(split), s["max_train_records"], s["seed"], "train")]
    budgets = dict(max_total_tokens=s["max_total_tokens"], max_response_tokens=s["max_response_tokens"],
                   truncate=s["truncation"] == "truncate")
    sft, sft_stats = pdata.encode_records(tok, s["template"], records, **budgets)
    # pairs: chosen = the record's reply, rejected = another record's (a seeded derangement), so
    # both lengths follow the real distribution
    rng = np.random.default_rng(s["seed"])
    other = (np.arange(len(records)) + rng.integers(1, len(records), len(records))) % len(records)
    pairs = [pdata.PreferencePair(r.persona, r.history, r.response, records[j].response)
             for r, j in zip(records, other)]
    dpo, dpo_stats = pdata.encode_records(tok, s["template"], pairs, **budgets)
    out = assemble(s, pdata.pad_id(tok), sft, dpo, n_batches)
    out.update(sft_encode=repr(sft_stats), dpo_encode=repr(dpo_stats))
    with open(path, "w") as fh:
        json.dump(out, fh)
    return {k: out[k] for k in ("sft_encode", "dpo_encode", "layouts")}


def assemble(s: dict, pad_id: int, sft: list, dpo: list, n_batches: int) -> dict:
    """The workload of encoded SFT examples and DPO pairs (`pdata.Encoded` / `EncodedPair`)
    under settings `s`: their ids, the first `n_batches` batches of the trainer's epoch-0 plan
    (example indices per batch) and the padding of every layout over them (`layouts`)."""
    from pdpo_jax import data as pdata
    out = dict(settings=s, pad_id=pad_id, n_batches=n_batches,
               sft=[dict(p=e.prompt_ids.tolist(), r=e.response_ids.tolist()) for e in sft],
               dpo=[dict(p=e.prompt_ids.tolist(), c=e.chosen_ids.tolist(), r=e.rejected_ids.tolist())
                    for e in dpo])
    for task, builder in (("sft", pdata.sft_batches), ("dpo", pdata.preference_batches)):
        batches = builder(examples(out, task), **pipeline_kwargs(out, task, packed=False))
        if batches.batches_per_epoch < n_batches:
            raise ValueError(f"{task}: {batches.batches_per_epoch} batches per epoch, {n_batches} asked for")
        out[f"{task}_plan"] = [batches[k]["index"].tolist() for k in range(n_batches)]
    out["layouts"] = layouts(out)
    return out


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def examples(w: dict, task: str) -> list:
    """The encoded examples (`pdata.Encoded` / `EncodedPair`) of the workload."""
    import numpy as np

    from pdpo_jax.data.encode import Encoded, EncodedPair
    ids = lambda x: np.asarray(x, np.int32)  # noqa: E731
    if task == "sft":
        return [Encoded(ids(e["p"]), ids(e["r"])) for e in w["sft"]]
    return [EncodedPair(ids(e["p"]), ids(e["c"]), ids(e["r"])) for e in w["dpo"]]


def pipeline_kwargs(w: dict, task: str, packed: bool) -> dict:
    """The trainer's batch pipeline settings (`stages._batch_kwargs`), one host, no accumulation."""
    from pdpo_jax import data as pdata
    s = w["settings"]
    row_len = s["sft_pack_length"] if task == "sft" else s["dpo_pack_length"]
    return dict(batch_size=s[f"{task}_batch"], pad_id=w["pad_id"], buckets=s["buckets"], seed=s["seed"],
                shuffle=True, drop_remainder=True, num_epochs=None, process_index=0, process_count=1,
                packing=pdata.Packing(row_len) if packed else None)


def useful_tokens(w: dict, task: str, plan_row: list[int]) -> int:
    """Real tokens of one batch, counted once: prompt + response (SFT), prompt + chosen +
    rejected (DPO)."""
    items = [w[task][i] for i in plan_row if i >= 0]
    keys = ("p", "r") if task == "sft" else ("p", "c", "r")
    return sum(len(e[k]) for e in items for k in keys)


def dynamic_rows(w: dict, task: str, plan_row: list[int]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of each row a PyTorch step runs: a record, or a pair's chosen rows
    then its rejected rows (the prompt in both)."""
    items = [w[task][i] for i in plan_row if i >= 0]
    if task == "sft":
        return [(e["p"] + e["r"], len(e["p"])) for e in items]
    return ([(e["p"] + e["c"], len(e["p"])) for e in items]
            + [(e["p"] + e["r"], len(e["p"])) for e in items])


def layouts(w: dict) -> dict:
    """Per task and layout, over the plan's batches: token slots the blocks run, real tokens in
    them, useful tokens, and the padding share 1 - real / slots (and 1 - useful / slots)."""
    from pdpo_jax import data as pdata
    out = {}
    for task in ("sft", "dpo"):
        plan = w[f"{task}_plan"]
        useful = sum(useful_tokens(w, task, row) for row in plan)
        rows = {}
        for packed in (False, True):
            builder = pdata.sft_batches if task == "sft" else pdata.preference_batches
            batches = builder(examples(w, task), **pipeline_kwargs(w, task, packed))
            slots = real = 0
            for k in range(len(plan)):
                st = jax_step_shape(w, task, batches[k], packed)
                slots, real = slots + st["slots"], real + st["real"]
            rows["ours-packed" if packed else "ours-bucketed"] = (slots, real)
        dyn_slots = dyn_real = 0
        for row in plan:
            r = dynamic_rows(w, task, row)
            dyn_slots += len(r) * max(len(ids) for ids, _ in r)
            dyn_real += sum(len(ids) for ids, _ in r)
        rows["torch-dynamic"] = (dyn_slots, dyn_real)
        out[task] = {name: dict(slots=s, real=r, useful=useful, padding_share=round(1 - r / s, 4),
                                non_useful_share=round(1 - useful / s, 4))
                     for name, (s, r) in rows.items()}
    return out


def jax_step_shape(w: dict, task: str, batch: dict, packed: bool) -> dict:
    """What a pdpo_jax step runs for one host batch: token slots through the blocks, real tokens
    among them, positions through the LM head (and the last layer's queries), the shape key."""
    import numpy as np
    window = w["settings"]["max_response_tokens"]
    if packed:
        seg = np.asarray(batch["segments"])
        return dict(slots=seg.size, real=int((seg > 0).sum()), head=int(np.asarray(batch["valid"]).size),
                    key=(seg.shape, np.asarray(batch["valid"]).shape))
    if task == "sft":
        mask = np.asarray(batch["attention_mask"])
        B, T = mask.shape
        return dict(slots=B * T, real=int(mask.sum()), head=B * window, key=(B, T))
    # unpacked DPO with dpo.share_prompt: one row [prompt | chosen | rejected] of T + window
    # per pair (train/logprobs.shared_prompt_rows), 2 * window scored columns
    B, T = np.asarray(batch["chosen_tokens"]).shape
    real = useful_tokens(w, task, [int(i) for i in batch["index"]])
    return dict(slots=B * (T + window), real=real, head=2 * B * window, key=(B, T))


def step_flops(task: str, slots: int, head: int, last_layer_selected: bool) -> int:
    """FLOPs a step executes (as `common.step_flops` counts): 2 per multiply-add, × 3 for the
    policy's forward + backward (6 in all), + 2 for the DPO reference's forward over the same
    layout; the blocks on every token slot (padding included), the LM head on `head`
    positions; with `last_layer_selected` the last layer's queries, output projection, MLP and
    norms at the head positions only (pdpo_jax's `hidden_states(select_BQ=)`). Attention's
    T×T matmuls are not counted (as common.step_flops)."""
    pc = common.param_counts(MODEL)
    k = 6 if task == "sft" else 8
    flops = k * (pc["blocks"] * slots + pc["lm_head"] * head)
    if last_layer_selected:
        flops -= k * pc["last_layer_queries"] * max(slots - head, 0)
    return flops


def model_flops(task: str, useful: int) -> int:
    """6·N (SFT) or 8·N (DPO: policy 6N + reference 2N) per useful token, N = non-embedding
    params + LM head (`common.param_counts`)."""
    return (6 if task == "sft" else 8) * common.param_counts(MODEL)["n_flops"] * useful


def finish(record: dict, times: list[float], steps: list[dict], first_s: float, peaks: dict) -> dict:
    """Per-record metrics over the timed steps (each its own batch): useful tokens/s = all the
    timed steps' useful tokens / their summed time (`tok_s`; every row of a run times the same
    batches, so it compares rows directly), mean s/step, median ms/step and the median of the
    per-step rates, executed and model FLOP rates, MFU vs the GEMM peak of the row's precision,
    peak RSS, host."""
    import statistics
    task = record["task"]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    useful_rate = [s["useful"] / t for s, t in zip(steps, times)]
    exec_rate = [step_flops(task, s["slots"], s["head"], record["last_layer_selected"]) / t
                 for s, t in zip(steps, times)]
    model_rate = [model_flops(task, s["useful"]) / t for s, t in zip(steps, times)]
    record.update(step_time=common.summarize(times), step_ms=round(med(times) * 1e3, 1),
                  tok_s=sum(s["useful"] for s in steps) / sum(times), s_per_step=sum(times) / len(times),
                  useful_tok_s=med(useful_rate), executed_flops_per_s=med(exec_rate),
                  model_flops_per_s=med(model_rate), first_step_s=round(first_s, 2),
                  steps=steps, useful_tokens=sum(s["useful"] for s in steps),
                  slots=sum(s["slots"] for s in steps), head_positions=sum(s["head"] for s in steps),
                  padding_share=round(1 - sum(s["real"] for s in steps) / sum(s["slots"] for s in steps), 4))
    peak = (peaks or {}).get("machine_bf16" if record["precision"] == "bf16" else "machine_fp32")
    if peak:
        record.update(peak_flops=peak, mfu=record["executed_flops_per_s"] / peak,
                      mfu_useful=record["model_flops_per_s"] / peak)
    return common.add_process_facts(record)
