"""Map post-processing shared by evaluation, prediction and the explorer: the blur, top-k
scores and sizes given at the paper's 518 px, and safe file names."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from scipy import ndimage

from pfl.method.contract import Batch, Method, Prediction

REFERENCE_SIZE = 518  # the paper's input side: sigma and top-k are given at this size
IMAGE_SCORES = ("per_image", "official_minmax", "official")


def scaled_sigma(sigma: float, image_size: int) -> float:
    """Blur sigma in pixels at ``image_size`` for ``sigma`` given at 518 px."""
    return sigma * image_size / REFERENCE_SIZE


def scaled_topk(topk: int, image_size: int) -> int:
    """Top-k count at ``image_size`` for ``topk`` given at 518 px (scaled by area, >= 1)."""
    return max(1, round(topk * (image_size / REFERENCE_SIZE) ** 2))


def safe_name(text: str) -> str:
    """A file-name stem: letters, digits, ``-`` and ``_`` only (no dots: ``Path.with_suffix``).

    >>> safe_name("medical_Bayes-PFL (untrained)"), safe_name("mvtec_tableA.4")
    ('medical_Bayes-PFL_untrained', 'mvtec_tableA4')
    """
    out = "".join(ch if ch.isalnum() or ch in "-_" else ("" if ch == "." else "_")
                  for ch in text)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


def smooth_maps(maps: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray:
    """Gaussian blur of each map ``(N, H, W)`` with ``sigma`` pixels (scipy, 'reflect' edges,
    truncated at 4 sigma), in float64 for float64 maps (the smoke profile) and float32
    otherwise; ``sigma <= 0`` returns the maps unchanged."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    dtype = np.float64 if np.asarray(maps).dtype == np.float64 else np.float32
    maps = np.asarray(maps, dtype=dtype)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got {maps.shape}")
    if sigma <= 0:
        return maps
    return ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect", truncate=4.0)


def topk_mean(maps: np.ndarray, k: int) -> np.ndarray:
    """Mean of the ``k`` largest values of each map ``(N, H, W) -> (N,)``."""
    flat = np.asarray(maps).reshape(len(maps), -1)
    k = min(k, flat.shape[1])
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def predict_with_std(method: Method, batch: Batch, generator: torch.Generator, want_std: bool,
                     *, option: str = "--uncertainty", fix: str = "run without --uncertainty",
                     **kw) -> tuple[Prediction, np.ndarray | None]:
    """``method.predict(batch, generator, **kw)``; with ``want_std`` it is asked for
    ``Prediction.map_std`` in the same call, the per-pixel standard deviation over the R Monte
    Carlo samples that the map is the mean of (so the two come from the same draws).

    Returns the prediction and, with ``want_std``, the std ``(N, S, S)`` as float64 numpy
    (unsmoothed), else None. A method that gives no ``map_std`` (the peers draw no samples) is
    a ``ValueError`` naming it, ``option`` and ``fix``; raised before it predicts anything when
    its ``predict`` has no ``map_std`` keyword. Shared by ``pfl predict --uncertainty``,
    ``EvalConfig.uncertainty`` and the explorer's uncertainty toggle.
    """

    def no_std() -> ValueError:
        name = getattr(method, "name", type(method).__name__)
        return ValueError(f"{name} gives no per-pixel standard deviation (Prediction.map_std: "
                          f"the spread of the map over Monte Carlo prompt samples, which only "
                          f"a sampling method such as Bayes-PFL has), so {option} cannot be "
                          f"computed; {fix}")

    if not want_std:
        return method.predict(batch, generator, **kw), None
    if "map_std" not in inspect.signature(method.predict).parameters:
        raise no_std()
    pred = method.predict(batch, generator, map_std=True, **kw)
    if getattr(pred, "map_std", None) is None:
        raise no_std()
    return pred, pred.map_std.detach().double().cpu().numpy()
