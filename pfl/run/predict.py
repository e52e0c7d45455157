"""Anomaly maps and scores for the user's own images, from a trained checkpoint.

``python -m pfl predict --checkpoint RUN --images FILES_OR_FOLDERS --out DIR`` writes into
``DIR``:

- ``scores.csv``: one row per input image: ``path`` (as found), ``overlay`` (its figure,
  relative to ``DIR``), ``score`` (the method's image score), ``map_max`` (maximum of the
  smoothed map), ``anomalous`` (``yes`` when score >= ``--threshold``), with
  ``--uncertainty`` ``std_mean``/``std_max``, and ``skipped`` (why an unreadable image was
  left out with ``--skip-bad``; empty otherwise);
- per image, a figure ``<name>_<ext>_overlay.png``: the image with its smoothed anomaly map
  over it on a fixed 0-1 colour scale (so images can be compared), a colour bar, and the score;
  with ``--uncertainty`` a second panel shows the per-pixel standard deviation over the R
  Monte Carlo prompt samples, and ``<name>_<ext>_maps.npz`` holds both maps as arrays.

Output names cannot collide: the input tree is mirrored under ``DIR`` (relative to the folder
that holds all inputs, so ``test/good/000.png`` and ``test/crack/000.png`` give
``good/000_png_overlay.png`` and ``crack/000_png_overlay.png``), and the extension is part of
the name (``coffee.jpg`` and ``coffee.png`` give ``coffee_jpg_...`` and ``coffee_png_...``).
Everything is written into a hidden folder beside ``DIR`` and renamed to ``DIR`` at the end,
so a run's outputs appear together or not at all. Inputs, the output folder and the
checkpoint folder are checked before the model loads (:func:`check_inputs`).

The model is class-aware (docs/reproduction.md, "Prompts"): it needs the object's name
(``--class-name``, default ``"object"``). Maps are blurred as in evaluation (sigma 8 px at
518 px, scaled to the input size, :mod:`pfl.run.evaluate`) and resized to each image's own
size for the overlay.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from pfl.clip.backbone import ImageFeatures
from pfl.config import EvalConfig
from pfl.data.preprocess import image_to_tensor, to_pil_rgb
from pfl.method.contract import Batch, Method
from pfl.run.checkpoints import load_run
from pfl.run.features import progress_enabled
from pfl.run.inputs import InputImage, Inputs, check_inputs, check_output, check_run, decode_image
from pfl.run.postprocess import predict_with_std, scaled_sigma, smooth_maps
from pfl.utils import atomic_write
from pfl.viz.plots import plot_prediction, save_figure


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` fully decoded, as RGB; a ``ValueError`` naming it otherwise."""
    return to_pil_rgb(decode_image(path))


def overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``anomaly_map`` (values in [0, 1], any size) blended over it in 'jet'."""
    from matplotlib import colormaps

    m = Image.fromarray(np.clip(anomaly_map, 0, 1).astype(np.float32), "F")
    m = np.asarray(m.resize(image.size, Image.BILINEAR))
    heat = (colormaps["jet"](m)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(heat, "RGB"), alpha)


def publish(tmp: Path, out: Path, overwrite: bool = False) -> Path:
    """Rename the finished folder ``tmp`` to ``out`` (an empty ``out`` is replaced; a full one
    only with ``overwrite``, swapped out and then removed)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        check_output(out, overwrite)
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def predict_images(method: Method, images: Sequence[str | Path] | Inputs, out_dir: str | Path,
                   *, class_name: str = "object", threshold: float | None = 0.5,
                   cfg: EvalConfig | None = None, write_overlays: bool = True,
                   skip_bad: bool = False, uncertainty: bool = False, overwrite: bool = False,
                   progress: bool | None = None) -> pd.DataFrame:
    """Score ``images`` with ``method``; write overlays and ``scores.csv`` into ``out_dir``
    (module docstring: names, columns, all-or-nothing publication).

    ``images``: paths, or :class:`Inputs` from :func:`check_inputs` (checked already).
    ``uncertainty``: also the per-pixel standard deviation over the R samples (the method must
    give ``Prediction.map_std``). Returns the table of ``scores.csv``.
    """
    cfg = cfg or EvalConfig()
    out = Path(out_dir)
    inputs = images if isinstance(images, Inputs) else check_inputs(
        images, out, skip_bad=skip_bad, overwrite=overwrite)
    backbone = method.backbone
    size = backbone.image_size
    mode = getattr(method, "train", None)
    if callable(mode):
        mode(False)
    samples = getattr(method, "inference_samples", None)  # R, for methods that sample
    scope = (samples(cfg.mc_samples) if cfg.mc_samples is not None and callable(samples)
             else nullcontext())
    gen = torch.Generator().manual_seed(cfg.seed)
    needs_images = bool(getattr(method, "needs_images", False))
    sigma = scaled_sigma(cfg.sigma, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    rows = []
    bar = tqdm(total=len(inputs.images), desc="predict", unit="img",
               disable=not progress_enabled(progress))
    try:
        with torch.no_grad(), scope:
            for start in range(0, len(inputs.images), cfg.batch_size):
                chunk = inputs.images[start:start + cfg.batch_size]
                pils = [read_image(item.path) for item in chunk]
                x = torch.stack([image_to_tensor(p, size) for p in pils])
                feats: ImageFeatures = backbone.encode_image(x)
                batch = Batch(cls_names=[class_name] * len(chunk), feats=feats,
                              images=x if needs_images else None,
                              paths=[str(item.path) for item in chunk])
                pred, stds = predict_with_std(method, batch, gen, uncertainty)
                maps = smooth_maps(pred.maps, sigma)
                for j, (item, pil, m) in enumerate(zip(chunk, pils, maps)):
                    score = float(pred.scores[j])
                    std = None if stds is None else stds[j]
                    rows.append(_write_one(tmp, item, pil, m, score, std, threshold,
                                           write_overlays))
                bar.update(len(chunk))
        for item, why in inputs.skipped:
            rows.append({"path": str(item.path), "skipped": why})
        columns = ["path", "overlay", "score", "map_max", "anomalous", "std_mean", "std_max",
                   "skipped"]
        table = pd.DataFrame(rows)
        table = table.reindex(columns=[c for c in columns if c in table])
        atomic_write(tmp / "scores.csv", lambda p: table.to_csv(p, index=False))
        publish(tmp, out, overwrite)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return table


def _write_one(folder: Path, item: InputImage, pil: Image.Image, smoothed: np.ndarray,
               score: float, std: np.ndarray | None, threshold: float | None,
               write_overlays: bool) -> dict:
    """One image's figure (and maps) into ``folder``; its row of ``scores.csv``."""
    row: dict = {"path": str(item.path), "score": score, "map_max": float(smoothed.max())}
    if threshold is not None:
        row["anomalous"] = "yes" if score >= threshold else "no"
    if std is not None:
        row["std_mean"], row["std_max"] = float(std.mean()), float(std.max())
        dest = folder / f"{item.name}_maps.npz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dest, mean=smoothed.astype(np.float32), std=std.astype(np.float32))
    if write_overlays:
        title = (Path(item.name).parent / item.path.name).as_posix()  # e.g. good/000.png
        fig = plot_prediction(overlay(pil, smoothed), score, threshold=threshold, title=title,
                              std_map=std)
        save_figure(fig, folder / f"{item.name}_overlay.png")
        plt.close(fig)
        row["overlay"] = f"{item.name}_overlay.png"
    row["skipped"] = ""
    return row


def predict_checkpoint(checkpoint: str | Path, images: Sequence[str | Path] | Inputs,
                       out_dir: str | Path,
                       *, class_name: str = "object", threshold: float | None = 0.5,
                       skip_bad: bool = False, uncertainty: bool = False,
                       overwrite: bool = False, mc_samples: int | None = None,
                       progress: bool | None = None) -> pd.DataFrame:
    """:func:`predict_images` with the method and evaluation config of a training run; the run
    folder, the output folder and the inputs are checked before the model loads (``images``
    may be :class:`pfl.run.inputs.Inputs` checked already)."""
    check_run(checkpoint)
    inputs = images if isinstance(images, Inputs) else check_inputs(
        images, out_dir, skip_bad=skip_bad, overwrite=overwrite)
    method, profile = load_run(checkpoint)
    cfg = profile.eval
    if mc_samples is not None:
        cfg = replace(cfg, mc_samples=mc_samples)
    return predict_images(method, inputs, out_dir, class_name=class_name, threshold=threshold,
                          cfg=cfg, overwrite=overwrite, uncertainty=uncertainty,
                          progress=progress)
