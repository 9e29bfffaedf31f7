"""Padding share of one SFT epoch of a config's records: length buckets against packed rows.

    .venv/bin/python bench/packing_padding.py --config configs/smollm2_135m_2k.yaml \
        [--row-lengths 384,768,1024] [overrides ...]

Batches come from the trainer's own loader (`pdpo_jax.data.sft_batches`, the run's drawn and
encoded records, its batch size, buckets and seed); padding share = 1 - real tokens / tokens in
the batch arrays. Three layouts:
  buckets     one row per record, padded to the batch's bucket (`data.packing: false`)
  packed      rows of `row_len` tokens, first-fit; every batch of the epoch has the epoch's
              largest row count, so one program serves the epoch (what training runs)
  packed_own  the same rows, each batch with its own row count: what packing would carry if
              each distinct count compiled a program of its own (a bound, not a training mode)
Host-side only (no model, no device): a minute on the 2k config. Prints one JSON line per layout.
"""
from __future__ import annotations

import argparse
import json


def padding_shares(cfg, row_lengths: list[int]) -> list[dict]:
    from pdpo_jax import data as pdata
    from pdpo_jax.context import make_context
    from pdpo_jax.data.packing import packed_needs
    from pdpo_jax.train.stages import encode
    ctx = make_context(cfg)
    encoded, _ = encode(ctx, ctx.dialogues("train"), "sft train")
    common = dict(batch_size=cfg.sft.batch_size, pad_id=pdata.pad_id(ctx.tokenizer),
                  buckets=cfg.data.buckets, seed=cfg.run.seed, process_index=0, process_count=1)
    bucketed = pdata.sft_batches(encoded, **common)
    batches = [bucketed[k] for k in range(len(bucketed))]
    real = sum(int(b["attention_mask"].sum()) for b in batches)  # the epoch's record tokens
    out = [dict(layout="buckets", row_len=None, batches=len(batches),
                padding_share=1 - real / sum(b["tokens"].size for b in batches))]
    for row_len in row_lengths:
        packed = pdata.sft_batches(encoded, packing=pdata.Packing(row_len), **common)
        packed = [packed[k] for k in range(len(packed))]
        own = sum(packed_needs([encoded[i] for i in b["index"] if i >= 0], row_len)[0]
                  for b in packed) * row_len
        out.append(dict(layout="packed", row_len=row_len, rows=packed[0]["tokens"].shape[0],
                        padding_share=1 - real / sum(b["tokens"].size for b in packed)))
        out.append(dict(layout="packed_own", row_len=row_len, padding_share=1 - real / own))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--row-lengths", default="384,768,1024")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from pdpo_jax.config import load_config
    cfg = load_config(args.config, tuple(args.overrides))
    for record in padding_shares(cfg, [int(x) for x in args.row_lengths.split(",")]):
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))


if __name__ == "__main__":
    main()
