"""`python -m pdpo_jax.train --config configs/X.yaml [section.key=value ...]`."""
from __future__ import annotations

import argparse
import sys

from pdpo_jax import allocator
from pdpo_jax.cli import run_cli, setup_logging
from pdpo_jax.config import load_config


def make_parser() -> argparse.ArgumentParser:
    """The trainer's arguments (also what launch scripts parse their trainer arguments with)."""
    parser = argparse.ArgumentParser(prog="python -m pdpo_jax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.max_steps=10")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host; auto-detects "
                             "Cloud TPU and SLURM, else reads JAX_COORDINATOR_ADDRESS etc.)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    allocator.synchronous_cpu_dispatch()  # before any JAX client exists
    setup_logging()
    return run_cli(lambda: _train(args))


def _train(args) -> int:
    cfg = load_config(args.config, tuple(args.overrides))
    if args.distributed:
        import jax
        jax.distributed.initialize()
    from pdpo_jax import pipeline  # after distributed init: it touches jax devices
    out = pipeline.run(cfg)
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    allocator.use_tcmalloc("pdpo_jax.train")  # re-executes once with tcmalloc when it is installed
    sys.exit(main())
