"""`python -m pdpo_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] ...`: an
OpenAI-compatible server for an HF checkpoint (docs/serving.md). SIGINT / SIGTERM stop
accepting, let in-flight requests (streams included) finish, then stop the engine thread.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pdpo_jax.cli import run_cli, setup_logging
from pdpo_jax.errors import UserError

log = logging.getLogger("pdpo_jax.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdpo_jax.serve", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint folder with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: the "
                   "checkpoint folder's name)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded at once")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="prompt + completion tokens of one sequence (the KV ring's length)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a slot; beyond, requests get 429")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and compute (logits and sampling stay fp32)")
    p.add_argument("--max-top-k", type=int, default=50, help="largest top_k a request may ask")
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="decode steps per engine call: the streaming granularity")
    p.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds in-flight requests get to finish at shutdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_cli(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    from pdpo_jax import asgi
    from pdpo_jax.serve import ModelServer, create_app

    if args.max_queue < 0 or not 0 <= args.port < 65536 or args.steps_per_call < 1:
        raise UserError(f"--max-queue {args.max_queue} must be >= 0, --port {args.port} in "
                        f"[0, 65535] (0: a free one) and --steps-per-call {args.steps_per_call} >= 1")
    if args.graceful_timeout < 0:
        raise UserError(f"--graceful-timeout {args.graceful_timeout} must be >= 0 (seconds)")
    server = ModelServer.load(args.checkpoint, name=args.served_model_name, slots=args.slots,
                              max_model_len=args.max_model_len, max_queue=args.max_queue,
                              dtype=args.dtype, max_top_k=args.max_top_k,
                              steps_per_call=args.steps_per_call)
    app = create_app(server, stop_timeout=args.graceful_timeout)

    def ready(url: str) -> None:
        print(f"serving {server.name!r} ({args.slots} slots, {args.max_model_len} tokens, "
              f"{args.dtype}) at {url}/v1", flush=True)

    try:
        asgi.serve(app, args.host, args.port, ready=ready, log_level="info",
                   limit_concurrency=server.capacity + 32,
                   timeout_graceful_shutdown=int(args.graceful_timeout))
    except OSError as e:  # the port is taken, or the address is not ours
        raise UserError(str(e)) from None
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
