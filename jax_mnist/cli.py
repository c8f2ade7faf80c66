"""`jax-mnist` command line: one subcommand per task, one-line errors for bad input."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def cmd_summary(args) -> None:
    from jax_mnist.models import summarize

    print(summarize(args.model).format())


def build_parser() -> argparse.ArgumentParser:
    from jax_mnist.models import MODEL_NAMES

    parser = argparse.ArgumentParser(prog="jax-mnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="per-layer table: kind, output shape, parameters, receptive field")
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"jax-mnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jax-mnist {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
