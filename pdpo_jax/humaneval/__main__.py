"""python -m pdpo_jax.humaneval serve|report: the annotation app and its report (docs/humaneval.md).

A user mistake (bad flag, bad pairs file, database of other pairs, port in use) is one line
`error: …` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import secrets
import sys

_NAME = re.compile(r"^[^\x00-\x1f\x7f<>&\"':,]{1,40}$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _annotators(text: str) -> dict[str, str]:
    """'alice:TOKEN,bob:TOKEN' -> {name: token}."""
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, token = entry.partition(":")
        if not sep or not _NAME.match(name.strip()) or len(token) < 8 or len(token) > 200:
            raise argparse.ArgumentTypeError(
                f"--annotators entry {entry!r}: expected name:token with a name of 1-40 plain "
                "characters and a token of 8-200 characters (make one with python -c "
                "'import secrets; print(secrets.token_urlsafe(12))')")
        if name.strip() in out:
            raise argparse.ArgumentTypeError(f"--annotators names {name.strip()!r} twice")
        out[name.strip()] = token
    if not out:
        raise argparse.ArgumentTypeError("--annotators is empty; give name:token,...")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pdpo_jax.humaneval",
                     description="Human evaluation of the judge's pairs (paper §4.3, App. D).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the annotation app")
    serve.add_argument("--pairs", required=True,
                       help="judge folder (eval/judge), run folder, or pairs JSONL")
    serve.add_argument("--db", required=True, help="SQLite file of the study (created if absent)")
    serve.add_argument("--per-pair", type=int, default=3, help="annotators per pair (default 3)")
    serve.add_argument("--lang", choices=["en", "ja"], default="en",
                       help="instructions and page language")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--admin-token", help="admin token (default: generated and printed)")
    serve.add_argument("--annotators", type=_annotators,
                       help="name:token,... personal tokens (default: sign in by name)")
    serve.add_argument("--quota", type=int, help="pairs per annotator (default: even share)")
    serve.add_argument("--lease-minutes", type=float, default=30.0,
                       help="an unanswered pair returns to the pool after this long (default 30)")
    serve.add_argument("--seed", type=int, default=0, help="order of pairs and of replies")
    report = sub.add_parser("report", help="Table 3, agreement and κ against the judge")
    report.add_argument("--db", required=True, help="the study's SQLite file")
    report.add_argument("--judge", required=True, help="judge folder or pairs JSONL with verdicts")
    report.add_argument("--a", help="model A (the table gives A's win/draw/loss against B)")
    report.add_argument("--b", help="model B")
    report.add_argument("--out", help="output folder (default: <judge folder>/humaneval)")
    report.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from pdpo_jax import asgi
    from pdpo_jax.humaneval.app import Study, create_app
    from pdpo_jax.humaneval.pairs import load_pairs
    from pdpo_jax.humaneval.store import Store
    from pdpo_jax.humaneval.texts import texts

    if args.admin_token is not None and len(args.admin_token) < 8:
        raise ValueError("--admin-token needs at least 8 characters")
    pairs = load_pairs(args.pairs)
    store = Store(args.db, pairs, per_pair=args.per_pair, seed=args.seed,
                  lease_s=args.lease_minutes * 60, annotators=args.annotators, quota=args.quota)
    token = args.admin_token or secrets.token_urlsafe(16)
    app = create_app(Study(store, {p.id: p for p in pairs}, texts(args.lang), token))
    if not _loopback(args.host) and not args.annotators:
        print(f"warning: open study on {args.host}: anyone who reaches it can sign in by name; "
              "pass --annotators for personal tokens", file=sys.stderr)

    def ready(url: str) -> None:
        shown = "" if args.admin_token else f" with admin token {token}"
        print(f"human evaluation: {len(pairs)} pairs x {args.per_pair} annotators "
              f"(quota {store.quota} each) at {url}/ ; admin at {url}/admin{shown}", flush=True)

    asgi.serve(app, args.host, args.port, ready=ready, log_level="info")
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _report(args: argparse.Namespace) -> int:
    if (args.a is None) != (args.b is None):
        raise ValueError("give both --a and --b (or neither, when the pairs compare one model pair)")
    from pdpo_jax.humaneval.report import write_report  # matplotlib: only for the report

    path = write_report(args.db, args.judge, out=args.out, a=args.a, b=args.b,
                        bootstrap=args.bootstrap, seed=args.seed)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"serve": _serve, "report": _report}[args.command](args)
    except (ValueError, OSError) as e:  # PairsError and StoreError's callers' mistakes included
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
