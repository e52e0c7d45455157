"""What the user gives ``pfl predict`` and ``pfl evaluate``, checked before any model loads:
image files and folders, the output folder, the run folder.

This module imports only the standard library, NumPy and Pillow, so the command line can
answer a wrong path or an unreadable image within a second, before torch and the CLIP code
load (their import alone takes several seconds). Output naming and the rest of prediction:
:mod:`pfl.run.predict`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

CHECKPOINT = "checkpoint.safetensors"  # = pfl.run.checkpoints.CHECKPOINT (a test keeps them equal)
CONFIG = "config.json"  # = pfl.run.checkpoints.CONFIG

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputImage:
    """One image to score: ``path`` as found, ``name`` the output stem relative to the output
    folder (POSIX, e.g. ``"good/000_png"``)."""

    path: Path
    name: str


@dataclass
class Inputs:
    """Checked inputs of a prediction: the images to score and those skipped, with why."""

    images: list[InputImage]
    skipped: list[tuple[InputImage, str]] = field(default_factory=list)


def output_name(relative: str | Path) -> str:
    """The output stem of an input path relative to the inputs' common folder: its folders,
    then its stem and extension joined by ``_`` (extensions hold no ``_``, so two different
    paths never give one name).

    >>> output_name("test/good/000.png"), output_name("coffee.JPG")
    ('test/good/000_png', 'coffee_jpg')
    """
    p = Path(relative)
    return (p.parent / f"{p.stem}_{p.suffix.lstrip('.').lower()}").as_posix()


def _is_hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def collect_images(inputs: Sequence[str | Path], exclude: str | Path | None = None
                   ) -> list[InputImage]:
    """Image files from files and folders (a folder: its images at any depth, sorted; hidden
    files and folders, and anything under ``exclude`` (the output folder), are left out).

    Each image's output name mirrors its path relative to the deepest folder holding every
    input (:func:`output_name`); an image given twice is scored once.
    """
    found: list[Path] = []
    skip = Path(os.path.abspath(exclude)) if exclude is not None else None
    for item in inputs:
        p = Path(os.path.abspath(item))
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES and not _is_hidden(f, p)
                           and not (skip is not None and f.is_relative_to(skip)))
            if not files:
                raise FileNotFoundError(f"folder {item} holds no images "
                                        f"({', '.join(IMAGE_SUFFIXES)}): pass image files or "
                                        "a folder that holds some")
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder: check the "
                                    "path given to --images")
    if not found:
        raise ValueError("no images given: pass --images with files or a folder")
    found = list(dict.fromkeys(found))
    base = Path(os.path.commonpath([f.parent for f in found]))
    return [InputImage(f, output_name(f.relative_to(base))) for f in found]


def decode_image(path: str | Path) -> Image.Image:
    """The image at ``path`` fully decoded (a truncated file fails here); a ``ValueError``
    naming it otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}); pass only "
                         "image files (png, jpg, bmp, tif), or --skip-bad to skip it") from err


def check_output(out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise a ``ValueError`` when ``out_dir`` cannot take a prediction: it is a file, or a
    folder that is not empty (unless ``overwrite``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty: choose a new folder, or pass "
                         "--overwrite to replace it")


def check_inputs(images: Sequence[str | Path], out_dir: str | Path, *, skip_bad: bool = False,
                 overwrite: bool = False) -> Inputs:
    """Everything a prediction needs from the user, checked before any model loads: the images
    exist and decode (each unreadable one is an error naming it, or with ``skip_bad`` is
    skipped with the reason) and ``out_dir`` can take the results (:func:`check_output`)."""
    check_output(out_dir, overwrite)
    found = collect_images(images, exclude=out_dir)
    ok, skipped = [], []
    for item in found:
        try:
            decode_image(item.path)
            ok.append(item)
        except ValueError as err:
            skipped.append((item, str(err).split("; pass only")[0]))
    if skipped and not skip_bad:
        lines = "\n".join(f"  {why}" for _, why in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise ValueError(f"{len(skipped)} of {len(found)} images cannot be read:\n{lines}{more}"
                         "\nremove or replace them, or pass --skip-bad to score the others "
                         "(scores.csv then lists the skipped files and why)")
    if not ok:
        raise ValueError(f"none of the {len(found)} images can be read; nothing to score")
    return Inputs(ok, skipped)


def check_run(path: str | Path) -> dict:
    """The ``config.json`` of run folder ``path`` (or of the folder of a checkpoint file), after
    checking that the folder, its config and its checkpoint exist: a ``FileNotFoundError`` or
    ``ValueError`` naming what is missing and how to get it, before any model loads."""
    path = Path(path)
    how = (f"pass the folder that `python -m pfl train --out DIR` wrote (it holds {CHECKPOINT} "
           f"and {CONFIG}), or its {CHECKPOINT}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: {how}")
    folder, ckpt = (path, path / CHECKPOINT) if path.is_dir() else (path.parent, path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{folder} holds no {CHECKPOINT}: {how}")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: {how}")
    try:
        run = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}): retrain, or restore the file "
                         "that pfl train wrote") from e
    if not isinstance(run, dict) or "method" not in run:
        raise ValueError(f"{cfg_path} names no method: it is not the config.json of a run "
                         "folder; " + how)
    if run.get("profile") is None:
        raise ValueError(f"{path} was trained without a profile in config.json; rebuild the "
                         "method yourself and call pfl.run.checkpoints.load_checkpoint")
    return run
