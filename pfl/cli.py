"""The command line, and the only argparse in pfl: ``python -m pfl <command> ...``.

Each command is a thin wrapper: it parses, then calls one library function. Sections are
grouped by command; keep the parsing here and the work in the library.
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Zero-shot anomaly detection with Bayes-PFL (Bayesian Prompt Flow Learning, CVPR 2025): train
prompts on one dataset, then find defects in images of objects it has never seen, as a map
of where and a score of how likely.

Start with `pfl demo` (builds a small offline benchmark, trains, evaluates). On your own
images: `pfl predict --checkpoint runs/demo/run --images DIR --out DIR`.
PFL_PROFILE=paper selects the paper's setting (ViT-L-14-336 from a local file, real data)."""

EPILOG = "Run `pfl COMMAND --help` for a command's options."


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start here: build a small offline benchmark, train, "
                       "evaluate, write tables")
    p.add_argument("--out", default="runs/demo", help="folder for tables, checkpoints, figures")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from pfl.run.demo import run

    run(out=args.out)
    return 0


def _add_pretrain(sub, fields: bool = True) -> None:
    """``fields``: one flag per PretrainConfig field; False skips importing it (torch and
    open_clip, seconds) when another command runs."""
    import dataclasses

    p = sub.add_parser("pretrain", help="pretrain the tiny CLIP on procedural patterns, "
                       "optionally with photos (--photos, --photo-share; resumable)")
    p.add_argument("--out", default="runs/tiny_clip", help="folder for checkpoints and weights")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in all (same schedule); rerun to resume")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--workers", type=int, default=0, help="processes drawing the batches")
    p.add_argument("--machine", default=None, help="machine description for the record")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal)")
    p.set_defaults(func=_run_pretrain)
    if not fields:
        return
    from pfl.clip.pretrain import PretrainConfig

    # One flag per PretrainConfig field, so the defaults live in one place.
    for f in dataclasses.fields(PretrainConfig):
        default = getattr(PretrainConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            p.add_argument(flag, type=type(default[0]), nargs=len(default), default=None,
                           dest=f.name, help=f"default {' '.join(map(str, default))}")
        elif f.name == "photos":
            p.add_argument(flag, type=str, default=None, dest=f.name,
                           help="folder of photo stamps, e.g. /usr/share/tuxpaint/stamps "
                                "(apt-get install tuxpaint-stamps-default); default none")
        elif f.name == "init_weights":
            p.add_argument(flag, type=str, default=None, dest=f.name,
                           help="open_clip weights to continue from, e.g. "
                                "pfl/clip/assets/tiny_clip.safetensors; default: random init")
        elif f.name == "photo_share":
            p.add_argument(flag, type=float, default=None, dest=f.name,
                           help="share of pairs drawn from --photos, 0..1; default 0")
        elif f.name == "final_size":
            p.add_argument(flag, type=_int_or_none, default=None, dest=f.name,
                           help=f"int or none; default {default}")
        else:
            p.add_argument(flag, type=type(default), default=None, dest=f.name,
                           help=f"default {default}")


def _int_or_none(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


def _run_pretrain(args) -> int:
    import dataclasses
    import shlex

    from pfl.clip.pretrain import PretrainConfig, command_line, pretrain

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


def _add_data(sub) -> None:
    from pfl.data.adapters import ADAPTERS

    p = sub.add_parser("data", help="build the offline benchmark, or index a published dataset")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="build the synthetic benchmark (aux, target, medical)")
    s.add_argument("--out", default="data/synthetic", help="folder for <domain>/meta.json trees")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=None, help="image side in px (default 224)")
    s.add_argument("--n-normal", type=int, default=None,
                   help="normal test images per category (default 40)")
    s.add_argument("--n-anomalous", type=int, default=None,
                   help="anomalous test images per category (default 40)")
    s.add_argument("--n-train", type=int, default=None,
                   help="normal and anomalous train images per aux category (default 40 each)")
    s.add_argument("--domains", nargs="+", default=None, help="subset of aux target medical")
    s.add_argument("--workers", type=int, default=None, help="processes (default 2)")
    s.set_defaults(func=_run_data_synth)
    names = ", ".join(f"{k} ({a.title})" for k, a in ADAPTERS.items())
    c = dsub.add_parser("convert", help="write meta.json for a dataset in its published layout",
                        description=f"Datasets: {names}.")
    c.add_argument("dataset", help="registry name or published name, e.g. mvtec, VisA")
    c.add_argument("--root", required=True, help="the dataset's folder as published")
    c.add_argument("--out", default=None, help="folder for meta.json if root is read-only")
    c.add_argument("--check", action="store_true",
                   help="first open every image and mask and check each mask has its image's "
                   "size; list the files that fail and write nothing if any does")
    c.set_defaults(func=_run_data_convert)


def _run_data_synth(args) -> int:
    import time

    from pfl.data.synthetic import SynthConfig, build_benchmark

    changes = {"seed": args.seed}
    for key, val in (("image_size", args.size), ("n_test_normal", args.n_normal),
                     ("n_test_anomalous", args.n_anomalous), ("n_train_normal", args.n_train),
                     ("n_train_anomalous", args.n_train), ("workers", args.workers)):
        if val is not None:
            changes[key] = val
    if args.domains:
        changes["domains"] = tuple(args.domains)
    t0 = time.perf_counter()
    try:
        paths = build_benchmark(args.out, SynthConfig(**changes))
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d, p in paths.items():
        print(f"{d}: {p / 'meta.json'}")
    print(f"built in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_data_convert(args) -> int:
    from pfl.data.adapters import convert

    try:
        print(convert(args.dataset, args.root, out=args.out, check=args.check))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a method on the active profile's auxiliary dataset")
    p.add_argument("--out", default="runs/train", help="run folder: checkpoint, config, history")
    p.add_argument("--method", default="bayes-pfl", help="bayes-pfl (default) or a peer name")
    p.add_argument("--epochs", type=int, default=None, help="override TrainConfig.epochs")
    p.add_argument("--seed", type=int, default=None, help="override TrainConfig.seed")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from pfl.config import active
    from pfl.run import distributed
    from pfl.run.train import train_profile

    profile = active()
    changes = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    if changes:
        profile = profile.replace(train=changes)
    try:
        with distributed.session():  # torchrun: DDP over its processes; else one process
            _, history = train_profile(profile, args.out, method=args.method,
                                       progress=args.progress)
    except (FileNotFoundError, ValueError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_main_env():
        return 0
    loss = history.epochs[-1]["train_loss"] if history.epochs else float("nan")
    print(f"trained {args.method} on {profile.data.aux} ({profile.name} profile), "
          f"{len(history.epochs)} epochs, last train loss {loss:.4f}")
    print(f"checkpoint: {args.out}/checkpoint.safetensors (history: {args.out}/epochs.csv)")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot evaluation of a trained run on its targets")
    p.add_argument("--checkpoint", required=True, help="run folder written by `pfl train`")
    p.add_argument("--out", default=None, help="folder for tables and figures "
                   "(default: <checkpoint>/eval)")
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME_OR_PATH",
                   help="datasets to evaluate: names of folders under the run's data root, or "
                   "paths of folders holding a meta.json (absolute or relative to here; a "
                   "bare name is looked up under the data root first). Default: the run's "
                   "targets")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="R, the prompt samples per image (default: the run's ModelConfig.mc_test)")
    p.add_argument("--image-score", choices=("per_image", "official_minmax", "official"),
                   default=None,
                   help="image score recipe (default: the run's, per_image)")
    p.add_argument("--uncertainty", action="store_true", default=None,
                   help="add std_mean and std_max to samples/<dataset>.csv: per image, the "
                   "mean and max of the per-pixel standard deviation over the R Monte Carlo "
                   "prompt samples (unsmoothed; Bayes-PFL only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from pfl.run.inputs import check_run

    check_run(args.checkpoint)  # at once, before the model loads; the datasets are checked next
    from pfl.run import distributed
    from pfl.run.evaluate import evaluate_run, summary_frame

    out = args.out or f"{args.checkpoint}/eval"
    try:
        with distributed.session():  # torchrun: the images are shared out; rank 0 writes
            results, _ = evaluate_run(args.checkpoint, out, datasets=args.datasets,
                                      progress=args.progress, mc_samples=args.mc_samples,
                                      image_score=args.image_score,
                                      uncertainty=args.uncertainty)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_main_env():
        return 0
    print((100 * summary_frame(results)).round(1).to_string())
    print(f"tables: {out}/tables, figures: {out}/figures, all values: {out}/results.csv")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="anomaly maps and scores for your own images",
        description="Score your own images with a trained run. Writes into --out one figure "
        "per image (<name>_<ext>_overlay.png: the image with its anomaly map, a colour bar and "
        "the score; folders of the input are mirrored) and scores.csv (one row per image). "
        "Everything appears at once when the run ends; a failed run writes nothing.")
    p.add_argument("--checkpoint", required=True,
                   help="run folder written by `pfl train` (e.g. runs/demo/run)")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files and/or folders (searched at any depth)")
    p.add_argument("--out", required=True, help="new or empty folder for the figures and "
                   "scores.csv")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="image score at or above which an image is called anomalous "
                   "(default 0.5)")
    p.add_argument("--class-name", default="object",
                   help="what the images show, e.g. 'bottle' (the prompts are class-aware)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images that cannot be read instead of stopping; scores.csv "
                   "lists them with the reason")
    p.add_argument("--uncertainty", action="store_true",
                   help="also show the per-pixel standard deviation over the Monte Carlo "
                   "prompt samples, and save both maps as <name>_<ext>_maps.npz")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="R, the prompt samples per image (default: the run's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and is not empty")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    from pfl.run.inputs import check_inputs, check_run

    # Checked before torch and the model load, so a mistake is answered at once.
    check_run(args.checkpoint)
    inputs = check_inputs(args.images, args.out, skip_bad=args.skip_bad,
                          overwrite=args.overwrite)
    from pfl.run.predict import predict_checkpoint

    table = predict_checkpoint(args.checkpoint, inputs, args.out,
                               class_name=args.class_name, threshold=args.threshold,
                               skip_bad=args.skip_bad, uncertainty=args.uncertainty,
                               overwrite=args.overwrite, mc_samples=args.mc_samples,
                               progress=args.progress)
    scored = table[table["skipped"] == ""]
    n_bad = int((scored["anomalous"] == "yes").sum())
    print(f"{len(scored)} images, {n_bad} at or above threshold {args.threshold}")
    if len(scored) < len(table):
        print(f"skipped {len(table) - len(scored)} unreadable images (listed in scores.csv)")
    print(f"scores: {args.out}/scores.csv, figures: {args.out}/**/*_overlay.png")
    return 0


def _add_import_official(sub) -> None:
    p = sub.add_parser("import-official",
                       help="the authors' released checkpoint -> a pfl run folder")
    p.add_argument("checkpoint", help="the authors' .pth ({'MyModel': state_dict})")
    p.add_argument("--out", required=True, help="run folder to write (for evaluate/predict)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2,
                   help="image score of the second stage (2, their default) or the first")
    p.set_defaults(func=_run_import_official)


def _run_import_official(args) -> int:
    from pfl.config import active, official
    from pfl.run.official import import_official

    base = active()
    profile = official(base if base.name != "smoke" else None)
    try:
        report = import_official(args.checkpoint, args.out, profile=profile, stage=args.stage)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"next: python -m pfl evaluate --checkpoint {args.out}")
    return 0


def _add_figures(sub) -> None:
    p = sub.add_parser("figures", help="re-execute the notebooks in order; rewrites figures/")
    p.add_argument("--profile", choices=("smoke", "paper"), default=None,
                   help="profile of the kernels (default: $PFL_PROFILE, else smoke)")
    p.add_argument("--only", nargs="+", default=None,
                   help="notebook numbers or names to run (default: all, in order)")
    p.add_argument("--clean", action="store_true",
                   help="remove every PNG/CSV of figures/ first (rebuild from a clean state)")
    p.add_argument("--save", action="store_true",
                   help="write the executed notebooks back (smoke profile only)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--notebooks", default=None, help="notebook folder (default notebooks/)")
    p.add_argument("--figures", default=None, help="figure folder (default figures/)")
    p.add_argument("--list", action="store_true",
                   help="print which notebook cell writes each figure, run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the notebooks in order only")
    p.set_defaults(func=_run_figures)


def _run_figures(args) -> int:
    import hashlib

    from pfl.viz import figures

    nb_dir, fig_dir = figures.default_dirs()
    nb_dir = args.notebooks or nb_dir
    fig_dir = args.figures or fig_dir
    try:
        if args.list:
            for row in figures.figure_sources(nb_dir):
                print(f"{row['file']:32s} {row['notebook']} code cell {row['cell']}: "
                      f"{row['section']}")
            return 0
        paths = figures.numbered_notebooks(nb_dir, args.only)
        if args.dry_run:
            for p in paths:
                print(p.name)
            return 0
        runs = figures.regenerate(nb_dir, fig_dir, profile=args.profile, only=args.only,
                                  clean_first=args.clean, save=args.save, timeout=args.timeout)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sums = figures.digests(fig_dir)
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sums.items()).encode())
    print(f"{len(runs)} notebooks in {sum(r.seconds for r in runs):.0f} s; {len(sums)} files "
          f"in {fig_dir}, combined sha256 {combined.hexdigest()[:16]}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, the pretrain flags are only built when it names pretrain."""
    from pfl import __version__

    parser = argparse.ArgumentParser(prog="pfl", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_pretrain(sub, fields=argv is None or "pretrain" in argv)
    _add_data(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_import_official(sub)
    _add_figures(sub)
    return parser


# A user's mistake (a missing file, a bad path, malformed input) is printed as one line with
# exit code 2; PFL_DEBUG=1 shows the traceback instead.
USER_ERRORS = (OSError, ValueError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from pfl.runtime import setup

    setup()  # the profile's numerics ($PFL_PROFILE): the notebooks' numbers, from the shell
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("PFL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
