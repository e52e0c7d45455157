"""Anomaly maps and scores for the user's own images, from a trained checkpoint.

``python -m pfl predict --checkpoint RUN --images DIR_OR_FILES --out DIR [--threshold T]``
writes, per image, ``<name>_overlay.png`` (the image with the smoothed anomaly map over it, on
a fixed 0-1 colour scale so that images can be compared) and one ``scores.csv`` with the image
score, the map's maximum and, with a threshold, whether the image is called anomalous.

The model is class-aware (REFERENCE.md, "Prompts"): it needs the object's name
(``--class-name``, default ``"object"``). Maps are blurred as in evaluation (sigma 8 px at
518 px, scaled to the input size, :mod:`pfl.run.evaluate`) and resized back to each image's own
size for the overlay.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pfl.clip.backbone import ImageFeatures
from pfl.config import EvalConfig
from pfl.data.preprocess import image_to_tensor, to_pil_rgb
from pfl.method.contract import Batch, Method
from pfl.run.checkpoints import load_run
from pfl.run.postprocess import scaled_sigma, smooth_maps
from pfl.utils import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder: its images, sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    if not files:
        raise ValueError("no images given: pass --images with files or a folder")
    return files


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return to_pil_rgb(im.copy())
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}); pass only "
                         "image files (png, jpg, bmp, tif)") from err


def overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``anomaly_map`` (values in [0, 1], any size) blended over it in 'jet'."""
    from matplotlib import colormaps

    m = Image.fromarray(np.clip(anomaly_map, 0, 1).astype(np.float32), "F")
    m = np.asarray(m.resize(image.size, Image.BILINEAR))
    heat = (colormaps["jet"](m)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(heat, "RGB"), alpha)


def predict_images(method: Method, images: Sequence[str | Path], out_dir: str | Path, *,
                   class_name: str = "object", threshold: float | None = 0.5,
                   cfg: EvalConfig | None = None, write_overlays: bool = True) -> pd.DataFrame:
    """Score ``images`` with ``method``; write overlays and ``scores.csv`` to ``out_dir``.

    Returns the table of ``scores.csv``: ``path``, ``score`` (the method's image score),
    ``map_max`` (maximum of the smoothed map) and, with ``threshold``, ``anomalous``
    (``"yes"`` when score >= threshold).
    """
    cfg = cfg or EvalConfig()
    out_dir = Path(out_dir)
    files = collect_images(images)
    backbone = method.backbone
    size = backbone.image_size
    mode = getattr(method, "train", None)
    if callable(mode):
        mode(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    needs_images = bool(getattr(method, "needs_images", False))
    rows = []
    for start in range(0, len(files), cfg.batch_size):
        chunk = files[start:start + cfg.batch_size]
        pils = [_open(f) for f in chunk]
        x = torch.stack([image_to_tensor(p, size) for p in pils])
        with torch.no_grad():
            feats: ImageFeatures = backbone.encode_image(x)
            batch = Batch(cls_names=[class_name] * len(chunk), feats=feats,
                          images=x if needs_images else None, paths=[str(f) for f in chunk])
            pred = method.predict(batch, gen)
        maps = smooth_maps(pred.maps, scaled_sigma(cfg.sigma, size))
        for f, pil, m, s in zip(chunk, pils, maps, pred.scores.tolist()):
            row = {"path": str(f), "score": float(s), "map_max": float(m.max())}
            if threshold is not None:
                row["anomalous"] = "yes" if s >= threshold else "no"
            if write_overlays:
                dest = out_dir / f"{f.stem}_overlay.png"
                blended = overlay(pil, m)
                atomic_write(dest, lambda p, im=blended: im.save(p, format="PNG"))
                row["overlay"] = str(dest)
            rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "scores.csv", lambda p: table.to_csv(p, index=False))
    return table


def predict_checkpoint(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                       *, class_name: str = "object", threshold: float | None = 0.5
                       ) -> pd.DataFrame:
    """:func:`predict_images` with the method and evaluation config of a training run."""

    method, profile = load_run(checkpoint)
    return predict_images(method, images, out_dir, class_name=class_name, threshold=threshold,
                          cfg=profile.eval)
