"""Pseudo-preference pairs (the paper's Section 3 and Figure 1).

For record i = (p_i, x_i, y_i): draw the persona p_j of a *different* dialogue whose persona text
also differs (from every dialogue of the split's file by default: `negatives.persona_pool`),
sample y_neg ~ π_sft(· | p_j, x_i), and keep (p_i, x_i, chosen=y_i, rejected=y_neg).
`negatives.filter: persona_margin` then keeps a pair only when y_neg is more likely under p_j
than under p_i by a margin (`persona_margin.py`).
Modes: `shuffle` (the method), `no_shuffle` (the ablation: y_neg ~ π_sft(· | p_i, x_i)),
`external` (pairs another model generated, stored as text and re-tokenized by whoever trains).

Generation runs in shards of `shard_size` records, each written atomically; a restarted run
skips finished shards, and since every row's random key is folded from the record's index, the
final file equals an uninterrupted run's. Process p of P takes shards p, p+P, … (host-local
devices), process 0 joins them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
from collections import Counter
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from pdpo_jax import data as pdata
from pdpo_jax import sharding as shd
from pdpo_jax.context import RunContext, check_tokenizer
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import atomic_path, write_json_atomic, write_jsonl_atomic
from pdpo_jax.models import from_pretrained
from pdpo_jax.data.batches import round_up
from pdpo_jax.sampling.engine import Engine
from pdpo_jax.sampling.persona_margin import PersonaMarginScorer, margin_summary
from pdpo_jax.sampling.sampler import SamplingConfig, stop_ids

log = logging.getLogger(__name__)
PROMPT_FILTER = "prompt_"  # a row's `filtered` reason when its sampling prompt did not encode


def swapped_personas(records: Sequence[pdata.PersonaTurn], seed: int,
                     pool: Sequence[pdata.PersonaTurn] | None = None) -> list[tuple[str, ...]]:
    """For each record a persona from another dialogue with different text, seeded per record,
    drawn from the personas of `pool` (default: `records` themselves)."""
    distinct: dict[tuple[str, ...], set[str]] = {}
    for rec in records if pool is None else pool:
        distinct.setdefault(tuple(rec.persona), set()).add(rec.dialogue_id)
    personas = list(distinct)
    if len(personas) < 2:
        raise ValueError(f"persona shuffling needs at least 2 distinct personas, the data has "
                         f"{len(personas)}; add dialogues or use negatives.mode=no_shuffle")
    out = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng([seed, i])
        own = tuple(rec.persona)
        while True:
            candidate = personas[int(rng.integers(len(personas)))]
            if candidate != own and rec.dialogue_id not in distinct[candidate]:
                out.append(candidate)
                break
    return out


@dataclasses.dataclass(frozen=True)
class NegativeJob:
    """One split's generation: records, the personas to sample under, and where to write."""
    name: str  # "train" or "dev"
    records: Sequence[pdata.PersonaTurn]
    sample_personas: Sequence[tuple[str, ...]]
    out_dir: pathlib.Path
    apply_filter: bool = True  # False: the margin filter scores this split's pairs, drops none


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class NegativeBuilder:
    """Samples rejected replies for records with a (possibly swapped) persona, shard by shard."""

    def __init__(self, model, tokenizer, template: str, sampling: SamplingConfig, *,
                 max_prompt_tokens: int, batch_size: int, shard_size: int, keep_truncated: bool,
                 generator: str, mesh=None, truncate: bool = True,
                 filter_margin: float | None = None, buckets: Sequence[int] = (128, 256, 512)):
        """truncate: False drops a record whose prompt needs history cut (data.truncation=drop).
        filter_margin: keep only pairs whose persona margin exceeds it (None: no filter)."""
        self.tokenizer, self.template, self.sampling = tokenizer, template, sampling
        self.max_prompt_tokens, self.batch_size = max_prompt_tokens, batch_size
        self.shard_size, self.keep_truncated, self.generator = shard_size, keep_truncated, generator
        self.truncate, self.filter_margin = truncate, filter_margin
        self.scorer = None if filter_margin is None else PersonaMarginScorer(
            model, tokenizer, template, max_prompt_tokens=max_prompt_tokens, truncate=truncate,
            batch_size=batch_size, buckets=buckets, mesh=mesh)
        self.engine = Engine(model, sampling, slots=round_up(batch_size, shd.batch_divisor(mesh)),
                             mesh=mesh)

    def run(self, job: NegativeJob) -> dict:
        """Writes <out_dir>/<name>_pairs.jsonl; returns the filter counts and length stats."""
        shard_dir = job.out_dir / f"{job.name}_shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        n_shards = -(-len(job.records) // self.shard_size)
        mine = range(jax.process_index(), n_shards, jax.process_count())
        todo = [k for k in mine if not (shard_dir / f"{k:05d}.jsonl").is_file()]
        bar = tqdm(total=sum(self._shard_len(job, k) for k in todo), desc=f"negatives/{job.name}",
                   unit="sample", dynamic_ncols=True)
        for k in todo:
            rows = self._generate_shard(job, k, bar)
            write_jsonl_atomic(shard_dir / f"{k:05d}.jsonl", rows)
        bar.close()
        _barrier(f"negatives-{job.name}")
        if jax.process_index() != 0:
            return {}
        rows = [json.loads(line) for k in range(n_shards)
                for line in (shard_dir / f"{k:05d}.jsonl").read_text(encoding="utf-8").splitlines()]
        return self._finish(job, rows)

    def _shard_len(self, job: NegativeJob, k: int) -> int:
        return min(self.shard_size, len(job.records) - k * self.shard_size)

    def _generate_shard(self, job: NegativeJob, k: int, bar) -> list[dict]:
        """Every record of shard k, each with its sample or the reason it was filtered."""
        start = k * self.shard_size
        indices = list(range(start, start + self._shard_len(job, k)))
        prompts, cut = {}, {}
        rows: dict[int, dict] = {}
        for i in indices:
            rec = job.records[i]
            try:
                enc = pdata.encode_pair(self.tokenizer, self.template, job.sample_personas[i],
                                        rec.history, max_prompt_tokens=self.max_prompt_tokens,
                                        truncate=self.truncate)
                prompts[i], cut[i] = enc.prompt_ids, enc.history_dropped
            except pdata.DoesNotFit as e:
                rows[i] = {"index": i, "filtered": f"{PROMPT_FILTER}{e.reason}"}
        # Continuous batching: a slot whose reply ended takes the next prompt at once. Each
        # row's random stream is keyed by its record index, so the shard's order is irrelevant.
        order = sorted(prompts)
        if order:
            out = self.engine.generate([prompts[i].tolist() for i in order], example_ids=order,
                                       progress=bar.update, max_prompt_len=self.max_prompt_tokens)
            for j, i in enumerate(order):
                rows[i] = self._row(job, i, out.tokens[j], int(out.lengths[j]), out.finish_reason[j])
                rows[i]["history_dropped"] = cut[i]
        bar.update(len(indices) - len(order))  # prompts that did not fit
        shard = [rows[i] for i in indices]
        self._filter_by_margin(shard, drop=job.apply_filter)
        return shard

    def _filter_by_margin(self, rows: list[dict], drop: bool = True) -> None:
        """Scores the persona margin of every row no other filter took; when `drop`, marks those
        at or below `filter_margin` (`persona_margin`) and those that could not be scored."""
        scored = [r for r in rows if "filtered" not in r]
        if self.scorer is None or not scored:
            return
        for row, margin in zip(scored, self.scorer.margins(scored)):
            row["persona_margin"] = None if math.isnan(margin) else float(margin)
            if not drop:
                continue
            if math.isnan(margin):
                row["filtered"] = "persona_margin_unscored"
            elif margin <= self.filter_margin:
                row["filtered"] = "persona_margin"

    def _row(self, job: NegativeJob, i: int, tokens, length: int, finish: str) -> dict:
        rec = job.records[i]
        ids = tokens[:length - 1] if finish == "stop" else tokens[:length]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        row = {"index": i, "id": rec.record_id, "persona": list(rec.persona),
               "swapped_persona": list(job.sample_personas[i]), "history": list(rec.history),
               "chosen": rec.response, "rejected": text, "finish_reason": finish,
               "rejected_tokens": int(length)}
        if finish == "length" and not self.keep_truncated:
            row["filtered"] = "truncated"
        elif not text:
            row["filtered"] = "empty"
        elif _normalise(text) == _normalise(rec.response):
            row["filtered"] = "identical_to_reference"
        return row

    def _finish(self, job: NegativeJob, rows: list[dict]) -> dict:
        counts = Counter(r.get("filtered", "kept") for r in rows)
        kept = [r for r in rows if "filtered" not in r]
        pairs = [self._pair(r) for r in kept]
        with atomic_path(job.out_dir / f"{job.name}_pairs.jsonl") as tmp:
            pdata.write_preference_jsonl(tmp, pairs)
        summary = {"split": job.name, "records": len(rows), "pairs": len(pairs),
                   "filtered": {k: v for k, v in counts.items() if k != "kept"},
                   "length_words": length_stats(kept, self.tokenizer),
                   "prompts": dataclasses.asdict(prompt_stats(rows))}
        if self.scorer is not None:
            margins = [math.nan if r["persona_margin"] is None else r["persona_margin"]
                       for r in rows if "persona_margin" in r]
            summary["persona_margin"] = (margin_summary(margins, self.filter_margin)
                                         | {"applied": job.apply_filter})
        write_json_atomic(job.out_dir / f"{job.name}_summary.json", summary, indent=2)
        shutil.rmtree(job.out_dir / f"{job.name}_shards")
        return summary

    def _pair(self, row: dict) -> pdata.PreferencePair:
        """A kept row as a preference pair; its metadata holds the trl-style prompt."""
        enc = pdata.encode_pair(self.tokenizer, self.template, row["persona"], row["history"],
                                max_prompt_tokens=self.max_prompt_tokens)
        prompt = self.tokenizer.decode(enc.prompt_ids.tolist(), skip_special_tokens=False)
        metadata = {"prompt": prompt, "swapped_persona": row["swapped_persona"],
                    "finish_reason": row["finish_reason"],
                    "sampling": dataclasses.asdict(self.sampling), "generator": self.generator,
                    "seed": self.sampling.seed}
        if "persona_margin" in row:
            metadata["persona_margin"] = row["persona_margin"]
        return pdata.PreferencePair(persona=tuple(row["persona"]), history=tuple(row["history"]),
                                    chosen=row["chosen"], rejected=row["rejected"],
                                    pair_id=row["id"], metadata=metadata)


def prompt_stats(rows: list[dict]) -> pdata.EncodeStats:
    """EncodeStats of the sampling prompts of a split's rows: records whose prompt did not
    encode (filtered `prompt_<reason>`) are dropped, the others kept with their cut turns."""
    dropped = Counter(r["filtered"].removeprefix(PROMPT_FILTER) for r in rows
                      if r.get("filtered", "").startswith(PROMPT_FILTER))
    kept = [r.get("history_dropped", 0) for r in rows
            if not r.get("filtered", "").startswith(PROMPT_FILTER)]
    return pdata.EncodeStats.count(kept, dropped)


def length_stats(rows: list[dict], tokenizer) -> dict:
    """Mean/median/p90 length (words and tokens) of chosen vs rejected: DPO learns from any
    systematic gap, including a length gap, so the report shows it."""
    out = {}
    for side in ("chosen", "rejected"):
        words = np.array([len(r[side].split()) for r in rows] or [0])
        tokens = np.array([len(tokenizer.encode(r[side], add_special_tokens=False)) for r in rows] or [0])
        out[side] = {"words_mean": float(words.mean()), "words_median": float(np.median(words)),
                     "words_p90": float(np.percentile(words, 90)),
                     "tokens_mean": float(tokens.mean())}
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------
# The pipeline stage


def run_negatives(ctx: RunContext) -> None:
    """The `negatives` stage: pairs for data.train and data.dev into <run>/negatives/."""
    cfg, neg = ctx.cfg, ctx.cfg.negatives
    out = ctx.stage_dir("negatives")
    if neg.mode == "external":
        copy_external_pairs(neg.external, out)
        return
    generator = ctx.sft_model()
    if generator is None:
        raise UserError("the negatives stage samples from an SFT model: add `sft` to run.stages "
                        "or set model.checkpoint")
    builder = _builder(ctx, generator)
    summaries = {}
    for split in ("train", "dev"):
        # train: SFT's records or the others (negatives.records); dev: SFT's dev records
        records = ctx.negative_records() if split == "train" else ctx.dialogues(split)
        pool = ctx.split_records(split) if neg.persona_pool == "split" else records
        personas = (swapped_personas(records, cfg.run.seed, pool) if neg.mode == "shuffle"
                    else [tuple(r.persona) for r in records])
        summaries[split] = builder.run(NegativeJob(split, records, personas, out,
                                                   apply_filter=split == "train" or neg.filter_dev))
    if jax.process_index() == 0:
        ctx.write_data_stats("negatives", {k: pdata.EncodeStats(**v["prompts"])
                                           for k, v in summaries.items()},
                             max_prompt_tokens=builder.max_prompt_tokens)
    log.info("negatives: %s", json.dumps(summaries))


def _builder(ctx: RunContext, generator: str) -> NegativeBuilder:
    cfg, neg = ctx.cfg, ctx.cfg.negatives
    mesh = ctx.mesh
    if jax.process_count() > 1:  # each host samples its own shards on its own devices
        mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())
    # Sampling needs no fp32 master weights: hold them in the compute dtype (bf16 halves a 13B),
    # loaded straight into the sampler's decode layout and sharding (no second copy).
    model = from_pretrained(generator, mesh=mesh, dtype=cfg.model.dtype,
                            param_dtype=cfg.model.dtype, rules=shd.SAMPLING_RULES,
                            stack_layers=False)
    check_tokenizer(ctx.tokenizer, model.cfg, generator)
    sampling = SamplingConfig(max_new_tokens=cfg.data.max_response_tokens,
                              temperature=neg.temperature or 1.0, greedy=neg.temperature == 0,
                              top_p=neg.top_p, top_k=neg.top_k,
                              eos_ids=stop_ids(ctx.tokenizer, model.cfg.eos_token_id), seed=cfg.run.seed,
                              pad_id=pdata.pad_id(ctx.tokenizer))
    return NegativeBuilder(model, ctx.tokenizer, cfg.data.template, sampling,
                           max_prompt_tokens=cfg.data.max_total_tokens - cfg.data.max_response_tokens,
                           batch_size=neg.batch_size, shard_size=neg.shard_size,
                           keep_truncated=neg.keep_truncated, generator=generator, mesh=mesh,
                           truncate=cfg.data.truncation == "truncate", buckets=cfg.data.buckets,
                           filter_margin=(neg.filter_margin if neg.filter == "persona_margin"
                                          else None))


def copy_external_pairs(folder: str | None, out: pathlib.Path) -> None:
    """negatives.mode=external: another run's train/dev pairs, validated, copied atomically."""
    if not folder:
        raise UserError("negatives.mode=external needs negatives.external: a folder holding "
                        "train_pairs.jsonl and dev_pairs.jsonl written by another run")
    for name in ("train_pairs.jsonl", "dev_pairs.jsonl"):
        src = pathlib.Path(folder) / name
        if not src.is_file():
            raise UserError(f"{src}: missing; negatives.external must be another run's "
                            "negatives folder")
        pdata.read_preference_jsonl(src)  # validates every line before anything is copied
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)
