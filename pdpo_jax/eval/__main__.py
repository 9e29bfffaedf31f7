"""Evaluate any HF checkpoints outside a training run.

    python -m pdpo_jax.eval dnli  --checkpoint sft=runs/x/sft/best --checkpoint dpo=runs/x/dpo/best \
        --out runs/x/eval [--max-examples 200] [eval.batch_size=64 ...]
    OPENAI_API_KEY=... python -m pdpo_jax.eval judge --checkpoint ... --out ... [eval.judge.comparisons=600]
    python -m pdpo_jax.eval curves runs/x/sft/metrics.jsonl runs/x/dpo/metrics.jsonl --out curves.png

`key=value` overrides set fields of the `eval:` section (pdpo_jax.eval.config), as in run configs.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import yaml

from pdpo_jax.config import build
from pdpo_jax.eval.config import EvalSection, resolve_checkpoints


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pdpo_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["dnli", "judge", "curves"])
    p.add_argument("inputs", nargs="*", help="curves: metrics.jsonl files; else eval.* overrides")
    p.add_argument("--checkpoint", action="append", default=[], help="[label=]HF folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the first checkpoint's)")
    p.add_argument("--template", default="english", help="prompt template the models were trained with")
    p.add_argument("--histories", help="judge: dialogue file of test histories (default: embedded dev)")
    p.add_argument("--out", required=True, help="output folder (curves: the PNG path)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def eval_section(overrides) -> EvalSection:
    raw: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} must look like eval.key=value")
        *parents, leaf = key.strip().removeprefix("eval.").split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return build(EvalSection, raw, "eval")


def main(argv=None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "curves":
        from pdpo_jax.eval.report import plot_training_curves
        sources = {pathlib.Path(f).parent.name: f for f in args.inputs}
        return str(plot_training_curves(sources, args.out))
    import transformers

    from pdpo_jax import data as pdata
    from pdpo_jax.eval.stages import run_dnli_stage, run_judge_stage
    cfg = eval_section(args.inputs)
    checkpoints = resolve_checkpoints(args.checkpoint or cfg.checkpoints)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        args.tokenizer or next(iter(checkpoints.values())))
    if args.command == "dnli":
        markdown = run_dnli_stage(args.out, checkpoints, tokenizer, cfg, args.template)
    else:
        histories = pdata.read_turns(args.histories or pdata.default_paths().dev)
        markdown = run_judge_stage(args.out, checkpoints, tokenizer, histories, cfg.judge,
                                   cfg.responses, template=args.template)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
