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


def _add_pretrain(sub) -> None:
    import dataclasses

    from pfl.pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="pretrain the tiny CLIP on procedural patterns (resumable)")
    p.add_argument("--out", default="runs/tiny_clip", help="folder for checkpoints and weights")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in all (same schedule); rerun to resume")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--workers", type=int, default=0, help="processes drawing the batches")
    p.add_argument("--machine", default=None, help="machine description for the record")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal)")
    # One flag per PretrainConfig field, so the defaults live in one place.
    for f in dataclasses.fields(PretrainConfig):
        default = getattr(PretrainConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            p.add_argument(flag, type=type(default[0]), nargs=len(default), default=None,
                           dest=f.name, help=f"default {' '.join(map(str, default))}")
        elif f.name == "final_size":
            p.add_argument(flag, type=_int_or_none, default=None, dest=f.name,
                           help=f"int or none; default {default}")
        else:
            p.add_argument(flag, type=type(default), default=None, dest=f.name,
                           help=f"default {default}")
    p.set_defaults(func=_run_pretrain)


def _int_or_none(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


def _run_pretrain(args) -> int:
    import dataclasses
    import shlex

    from pfl.pretrain import PretrainConfig, command_line, pretrain

    changes = {}
    for f in dataclasses.fields(PretrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            changes[f.name] = None if v == "none" else tuple(v) if isinstance(v, list) else v
    cfg = PretrainConfig(**changes)
    command = command_line(cfg, args.out)
    extra = []
    if args.device != "cpu":
        extra += ["--device", args.device]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    if extra:
        command += " " + shlex.join(extra)
    history = pretrain(cfg, args.out, stop_after=args.stop_after, progress=args.progress,
                       command=command, device=args.device, workers=args.workers,
                       machine=args.machine)
    print(f"step {len(history)}/{cfg.steps}: loss {history[-1]['loss']:.4f} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_pretrain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
