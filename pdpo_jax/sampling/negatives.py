"""Pseudo-preference pairs (the paper's Section 3 and Figure 1).

For record i = (p_i, x_i, y_i): draw the persona p_j of a *different* dialogue whose persona text
also differs, sample y_neg ~ π_sft(· | p_j, x_i), and keep (p_i, x_i, chosen=y_i, rejected=y_neg).
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
import pathlib
import shutil
from collections import Counter
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from pdpo_jax import data as pdata
from pdpo_jax.fileio import atomic_path, write_json_atomic, write_jsonl_atomic
from pdpo_jax.sampling.sampler import Sampler, SamplingConfig

MODES = ("shuffle", "no_shuffle", "external")


def swapped_personas(records: Sequence[pdata.PersonaTurn], seed: int) -> list[tuple[str, ...]]:
    """For each record a persona from another dialogue with different text, seeded per record."""
    distinct: dict[tuple[str, ...], set[str]] = {}
    for rec in records:
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


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class NegativeBuilder:
    """Samples rejected replies for records with a (possibly swapped) persona, shard by shard."""

    def __init__(self, model, tokenizer, template: str, sampling: SamplingConfig, *,
                 max_prompt_tokens: int, batch_size: int, shard_size: int, keep_truncated: bool,
                 generator: str, mesh=None):
        self.tokenizer, self.template, self.sampling = tokenizer, template, sampling
        self.max_prompt_tokens, self.batch_size = max_prompt_tokens, batch_size
        self.shard_size, self.keep_truncated, self.generator = shard_size, keep_truncated, generator
        self.sampler = Sampler(model, sampling, mesh=mesh)

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
        prompts = {}
        rows: dict[int, dict] = {}
        for i in indices:
            rec = job.records[i]
            try:
                enc = pdata.encode_pair(self.tokenizer, self.template, job.sample_personas[i],
                                        rec.history, max_prompt_tokens=self.max_prompt_tokens)
                prompts[i] = enc.prompt_ids
            except pdata.DoesNotFit as e:
                rows[i] = {"index": i, "filtered": f"prompt_{e.reason}"}
        order = sorted(prompts, key=lambda i: len(prompts[i]))  # similar lengths batch together
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            filled = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # one compiled shape
            out = self.sampler.generate([prompts[i].tolist() for i in filled], example_ids=filled)
            for j, i in enumerate(chunk):
                rows[i] = self._row(job, i, out.tokens[j], int(out.lengths[j]), out.finish_reason[j])
            bar.update(len(chunk))
        return [rows[i] for i in indices]

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
        sampling = dataclasses.asdict(self.sampling)
        pairs = []
        for r in kept:
            enc = pdata.encode_pair(self.tokenizer, self.template, r["persona"], r["history"],
                                    max_prompt_tokens=self.max_prompt_tokens)
            prompt = self.tokenizer.decode(enc.prompt_ids.tolist(), skip_special_tokens=False)
            pairs.append(pdata.PreferencePair(
                persona=tuple(r["persona"]), history=tuple(r["history"]), chosen=r["chosen"],
                rejected=r["rejected"], pair_id=r["id"],
                metadata={"prompt": prompt, "swapped_persona": r["swapped_persona"],
                          "finish_reason": r["finish_reason"], "sampling": sampling,
                          "generator": self.generator, "seed": self.sampling.seed}))
        with atomic_path(job.out_dir / f"{job.name}_pairs.jsonl") as tmp:
            pdata.write_preference_jsonl(tmp, pairs)
        summary = {"split": job.name, "records": len(rows), "pairs": len(pairs),
                   "filtered": {k: v for k, v in counts.items() if k != "kept"},
                   "length_words": length_stats(kept, self.tokenizer)}
        write_json_atomic(job.out_dir / f"{job.name}_summary.json", summary, indent=2)
        shutil.rmtree(job.out_dir / f"{job.name}_shards")
        return summary


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
