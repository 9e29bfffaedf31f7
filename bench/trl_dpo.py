"""trl's `DPOTrainer` on the same Llama, fully offline: steady-state step time.

    .venv/bin/python bench/trl_dpo.py                 # fp32: bf16=False, gradient_checkpointing=False
    .venv/bin/python bench/trl_dpo.py --defaults      # trl out of the box (DPOConfig's own bf16 and
                                                      # gradient_checkpointing defaults)

Offline: the reference model and the tokenizer are passed explicitly (otherwise trl looks
them up on the hub by name). The tokenizer is a WordLevel one over the words t4..t{V-1}, so
one word is one token: prompts of 96 words, completions of 31 words + the `</s>` trl appends
= 32 tokens, i.e. the same 8 pairs × 128 tokens as the other rows (checked on a collated
batch). Step time = gap between consecutive `on_step_end` callbacks, so it includes all that
Trainer does per step (collation, reference forward, backward, AdamW, bookkeeping).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (offline env vars before transformers/trl)
from torch_dpo import build_model  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {s: i for i, s in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(common.FIRST_WORD_ID, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def text_pairs(n_batches: int, vocab: int, pairs: int, seq_len: int) -> dict:
    words = lambda row: " ".join(f"t{int(i)}" for i in row)  # noqa: E731
    out = {"prompt": [], "chosen": [], "rejected": []}
    for seed in range(n_batches):
        prompt, chosen, rejected = common.preference_ids(seed, vocab, pairs, seq_len)
        for p, c, r in zip(prompt, chosen, rejected):
            out["prompt"].append(words(p))
            out["chosen"].append(" " + words(c[:-1]))  # + </s> appended by trl
            out["rejected"].append(" " + words(r[:-1]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defaults", action="store_true", help="trl out of the box (bf16 + grad ckpt)")
    common.step_args(ap, model=False)
    args = ap.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = build_model("anchor")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    vocab = common.MODELS["anchor"]["vocab_size"]
    total = args.warmup + args.steps
    data = Dataset.from_dict(text_pairs(total + 1, vocab, args.pairs, args.seq_len))
    overrides = {} if args.defaults else dict(bf16=False, gradient_checkpointing=False)
    scratch = tempfile.TemporaryDirectory(prefix="bench-trl-")  # removed when the worker exits
    cfg = DPOConfig(output_dir=scratch.name, per_device_train_batch_size=args.pairs,
                    max_steps=total, learning_rate=common.LR, beta=common.BETA, loss_type=["sigmoid"],
                    max_length=args.seq_len, use_cpu=True, report_to="none", save_strategy="no",
                    logging_steps=10_000, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
                    dataloader_pin_memory=False, **overrides)

    stamps, timer = common.trainer_step_stamps()

    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data,
                         processing_class=word_tokenizer(vocab), callbacks=[timer])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    if tuple(batch["input_ids"].shape) != (2 * args.pairs, args.seq_len) or \
            int(batch["completion_mask"].sum()) != 2 * args.pairs * common.RESPONSE:
        raise RuntimeError(f"trl collated {tuple(batch['input_ids'].shape)} with "
                           f"{int(batch['completion_mask'].sum())} completion tokens; expected "
                           f"{(2 * args.pairs, args.seq_len)} and {2 * args.pairs * common.RESPONSE}")
    common.reset_peak_rss()
    with common.Meter() as meter:  # covers warm-up steps too: the trainer runs them in one call
        trainer.train()
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    precision = "bf16" if cfg.bf16 else "fp32"
    label = "trl-defaults" if args.defaults else "trl-fp32"
    record = dict(bench="dpo", framework="trl", label=label, model="anchor", precision=precision,
                  window=None, pairs=args.pairs, seq_len=args.seq_len, compile_s=None,
                  bf16=bool(cfg.bf16), gradient_checkpointing=bool(cfg.gradient_checkpointing),
                  optim=str(cfg.optim), trl_version=trl.__version__,
                  transformers_version=transformers.__version__, torch_version=torch.__version__,
                  threads=[torch.get_num_threads(), torch.get_num_interop_threads()], **meter.result)
    record = common.finish(record, gaps[args.warmup:], gaps[0], common.load_peaks(args.peaks))
    common.log(f"[{label}] {record['step_ms']} ms/step, {record['tokens_per_s']:.0f} tok/s, "
               f"bf16={cfg.bf16} grad_ckpt={cfg.gradient_checkpointing} optim={cfg.optim}, "
               f"rss {record['peak_rss_mib']} MiB")
    common.emit(record)


if __name__ == "__main__":
    main()
