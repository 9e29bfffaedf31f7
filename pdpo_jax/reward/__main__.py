"""`python -m pdpo_jax.reward train --config configs/X.yaml [rl.reward.key=value ...]` trains the
NLI reward classifier of the config's `rl.reward` section into <out_dir>/best;
`python -m pdpo_jax.reward build-substitute OUT_DIR [--seed N]` writes the substitute NLI set
(nli_substitute_{train,dev}.jsonl and stats.json) built from the embedded SPC test split."""
from __future__ import annotations

import argparse
import json
import sys

from pdpo_jax import allocator
from pdpo_jax.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdpo_jax.reward", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the NLI classifier of the config's rl.reward")
    train.add_argument("--config", required=True, help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.reward.max_steps=10")
    build = sub.add_parser("build-substitute", help="write the substitute NLI set (data/README.md)")
    build.add_argument("out_dir", help="folder for nli_substitute_{train,dev}.jsonl and stats.json")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    allocator.synchronous_cpu_dispatch()  # before any JAX client exists
    setup_logging()
    return run_cli(lambda: _train(args) if args.command == "train" else _build(args))


def _train(args) -> int:
    from pdpo_jax import sharding as shd
    from pdpo_jax.config import load_config
    from pdpo_jax.reward.train import reward_dir, train_classifier
    cfg = load_config(args.config, tuple(args.overrides))
    section = cfg.rl.reward
    if section.checkpoint:
        print(f"rl.reward.checkpoint is set: {section.checkpoint} is used as it is; nothing to train")
        return 0
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    best = train_classifier(section, reward_dir(cfg), mesh=mesh, seed=cfg.run.seed,
                            keep=cfg.checkpoint.keep, save_every=cfg.checkpoint.save_every)
    selection = json.loads((best / "pdpo_selection.json").read_text())
    print(f"reward model: {best} (step {selection['step']:.0f}, dev accuracy {selection['accuracy']:.4f})")
    return 0


def _build(args) -> int:
    from pdpo_jax.data import default_paths
    from pdpo_jax.reward.substitute import build_substitute, write_substitute
    paths = default_paths()
    subset = build_substitute(paths.train, paths.dnli, seed=args.seed)
    train, dev = write_substitute(args.out_dir, subset)
    print(f"{train}: {subset.stats['train']['labels']}\n{dev}: {subset.stats['dev']['labels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
