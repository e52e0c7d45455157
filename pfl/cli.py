"""The command line, and the only argparse in pfl: ``python -m pfl <command> ...``.

Each command is a thin wrapper: it parses, then calls one library function. Sections are
grouped by command; keep the parsing here and the work in the library.
"""

from __future__ import annotations

import argparse
import sys


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the active profile (README's first command)")
    p.add_argument("--out", default="runs/demo", help="folder for tables, checkpoints, figures")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from pfl.demo import run

    run(out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
