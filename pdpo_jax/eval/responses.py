"""Replies of several checkpoints to the same test histories, for the judge to compare.

`sample_texts` is the one place this package generates text (`pdpo_jax.sampling.engine`), for
the checkpoints' replies and for the local judge alike: continuous batching over a fixed set of
slots, prompt lengths bucketed so few programs compile; each prompt's random stream is keyed
by its index, so a reply does not depend on which prompts it was generated with.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pdpo_jax import data as pdata
from pdpo_jax.config import ResponseSection
from pdpo_jax.data.batches import round_up
from pdpo_jax.fileio import (checkpoint_fingerprint, read_json, read_jsonl, text_hash,
                             write_json_atomic, write_jsonl_atomic)
from pdpo_jax.sharding import batch_divisor

log = logging.getLogger(__name__)


def sample_texts(model, tokenizer, prompts: Sequence[Sequence[int]], sampling: dict[str, Any], *,
                 batch_size: int, mesh=None, desc: str = "sample",
                 prompt_bucket: int = 64) -> Iterator[tuple[int, str, str]]:
    """(prompt index, decoded reply, finish reason) for each prompt.

    sampling: `pdpo_jax.sampling.SamplingConfig` fields (eos/pad ids come from the tokenizer).
    The replies come from the continuous-batching engine with `batch_size` slots; prompt i's
    random stream is keyed by i. A reply is decoded without its EOS and special tokens, and
    stripped.
    """
    from pdpo_jax.sampling import SamplingConfig
    from pdpo_jax.sampling.engine import Engine
    if not prompts:
        return
    eos = tokenizer.eos_token_id
    cfg = SamplingConfig(**{"eos_ids": (eos,), "pad_id": pdata.pad_id(tokenizer), **sampling})
    engine = Engine(model, cfg, slots=round_up(batch_size, batch_divisor(mesh)), mesh=mesh,
                    prompt_bucket=prompt_bucket)
    start = time.perf_counter()
    with tqdm(total=len(prompts), unit="reply", desc=desc) as bar:
        out = engine.generate([list(map(int, p)) for p in prompts], progress=bar.update)
    log.info("%s: %d replies in %.1fs", desc, len(prompts), time.perf_counter() - start)
    for i in range(len(prompts)):
        new = out.tokens[i, :out.lengths[i]]
        if out.finish_reason[i] == "stop":
            new = new[:-1]
        yield i, tokenizer.decode(new, skip_special_tokens=True).strip(), out.finish_reason[i]


def select_histories(records: Sequence[pdata.PersonaTurn], n: int, seed: int) -> list[pdata.PersonaTurn]:
    """n records (seeded, without replacement, in file order) that have a partner turn to answer."""
    usable = [r for r in records if r.history]
    if not usable:
        raise ValueError("no test record has a dialogue history to answer")
    if n >= len(usable):
        return usable
    picked = np.sort(np.random.default_rng(seed).choice(len(usable), n, replace=False))
    return [usable[i] for i in picked]


def response_sampling(cfg: ResponseSection) -> dict[str, Any]:
    """The SamplingConfig fields a ResponseSection sets (stored beside every reply)."""
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature or 1.0,
                top_p=cfg.top_p, top_k=cfg.top_k, greedy=cfg.greedy or cfg.temperature == 0,
                seed=cfg.seed)


def generate_responses(model, tokenizer, template, histories: Sequence[pdata.PersonaTurn],
                       cfg: ResponseSection, *, mesh=None, desc: str = "responses") -> list[dict]:
    """One reply per history: rows {history_index, record_id, response, finish_reason, sampling}."""
    prompts = [pdata.encode_pair(tokenizer, template, h.persona, h.history,
                                 max_prompt_tokens=cfg.max_prompt_tokens).prompt_ids
               for h in histories]
    sampling = response_sampling(cfg)
    rows = [None] * len(histories)
    for i, text, reason in sample_texts(model, tokenizer, prompts, sampling,
                                        batch_size=cfg.batch_size, mesh=mesh, desc=desc):
        rows[i] = {"history_index": i, "record_id": histories[i].record_id, "response": text,
                   "finish_reason": reason, "sampling": sampling}
    return rows


def histories_hash(histories: Sequence[pdata.PersonaTurn]) -> str:
    return text_hash(*(repr((h.record_id, h.persona, h.history)) for h in histories))[:16]


def responses_for_checkpoints(out_dir: str | os.PathLike, checkpoints: dict[str, pathlib.Path],
                              tokenizer, template, histories: Sequence[pdata.PersonaTurn],
                              cfg: ResponseSection, *, mesh=None) -> dict[str, list[str]]:
    """{label: replies aligned with `histories`}; each checkpoint's replies are stored in
    <out_dir>/<label>.jsonl and reused while checkpoint, histories, template and sampling match."""
    from pdpo_jax.models import from_pretrained
    from pdpo_jax.sharding import SAMPLING_RULES
    out_dir = pathlib.Path(out_dir)
    replies = {}
    for label, folder in checkpoints.items():
        meta = {"checkpoint": str(folder), "fingerprint": checkpoint_fingerprint(folder),
                "histories": histories_hash(histories), "sampling": response_sampling(cfg),
                "template": getattr(template, "name", template),
                "max_prompt_tokens": cfg.max_prompt_tokens}
        path, meta_path = out_dir / f"{label}.jsonl", out_dir / f"{label}.meta.json"
        if read_json(meta_path) == meta and path.is_file():
            log.info("responses of %s: reusing %s", label, path)
            rows = read_jsonl(path)
        else:
            # Only sampled from: loaded in the sampler's decode layout (one copy of the weights).
            model = from_pretrained(folder, mesh=mesh, rules=SAMPLING_RULES, stack_layers=False)
            rows = generate_responses(model, tokenizer, template, histories, cfg, mesh=mesh,
                                      desc=f"responses {label}")
            write_jsonl_atomic(path, rows)
            write_json_atomic(meta_path, meta)  # written last: its presence means "complete"
            del model
        replies[label] = [r["response"] for r in rows]
    return replies

