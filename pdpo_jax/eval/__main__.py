"""Evaluate any HF checkpoints outside a training run.

    python -m pdpo_jax.eval dnli  --checkpoint sft=runs/x/sft/best --checkpoint dpo=runs/x/dpo/best \
        --out runs/x/eval [--max-examples 200] [eval.batch_size=64 ...]
    OPENAI_API_KEY=... python -m pdpo_jax.eval judge --checkpoint ... --out ... [eval.judge.comparisons=600]
    python -m pdpo_jax.eval curves runs/x/sft/metrics.jsonl runs/x/dpo/metrics.jsonl --out curves.png

`key=value` overrides set fields of the `eval:` section (pdpo_jax.eval.config), as in run configs.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from pdpo_jax import allocator
from pdpo_jax.cli import run_cli, setup_logging
from pdpo_jax.config import EvalSection, build
from pdpo_jax.config.loading import set_dotted
from pdpo_jax.eval.checkpoints import resolve_checkpoints


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pdpo_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["dnli", "judge", "curves"])
    p.add_argument("inputs", nargs="*", help="curves: metrics.jsonl files; else eval.* overrides")
    p.add_argument("--checkpoint", action="append", default=[], help="[label=]HF folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the first checkpoint's)")
    p.add_argument("--template", default="english", help="prompt template the models were trained with")
    p.add_argument("--histories", help="judge: dialogue file of test histories (default: embedded dev)")
    p.add_argument("--max-examples", type=int, help="dnli: score this many examples (round-robin "
                   "over relation groups; = eval.max_examples)")
    p.add_argument("--out", required=True, help="output folder (curves: the PNG path)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def eval_section(overrides, max_examples: int | None = None) -> EvalSection:
    """The `eval:` section from `key=value` overrides (the `eval.` prefix optional)."""
    raw: dict = {} if max_examples is None else {"max_examples": max_examples}
    for item in overrides:
        set_dotted(raw, item, prefix="eval.")
    return build(EvalSection, raw, "eval")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    if args.command == "curves":
        from pdpo_jax.eval.plots import plot_training_curves
        sources = {pathlib.Path(f).parent.name: f for f in args.inputs}
        print(plot_training_curves(sources, args.out))
        return 0
    import transformers

    from pdpo_jax import data as pdata
    from pdpo_jax.eval.stages import run_dnli_stage, run_judge_stage
    cfg = eval_section(args.inputs, args.max_examples)
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
    return 0


if __name__ == "__main__":
    allocator.use_tcmalloc("pdpo_jax.eval")  # re-executes once with tcmalloc when it is installed
    sys.exit(main())
