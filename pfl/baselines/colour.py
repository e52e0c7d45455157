"""A colour baseline that learns nothing: CIELAB distance from the image's median colour.

Not a method of the paper. It answers the smoke profile's own question (README, "Measured"):
how much of a localisation score does colour alone explain on the synthetic benchmark, whose
painted defects often differ in colour from the object around them? A method that does not
beat it clearly has learned little beyond colour.

The map: the image is de-normalised to RGB in [0, 1] (:func:`pfl.data.preprocess.denormalize`),
converted to CIELAB (scikit-image's ``rgb2lab``, D65), and each pixel's score is its Euclidean
distance (CIE76 Delta E) from the image's per-channel median Lab colour, divided by a **fixed**
constant, :func:`lab_box_diagonal` (~291.5): the diagonal of the box that holds every Lab colour
of the sRGB cube. Why fixed and not min-max per image: (1) a per-image rescale sends every map's
maximum to 1, so the image score (the map's maximum) would be 1 for every image, and the
pixels of a flawless image would be spread over [0, 1] as if it held a defect, so pooled pixel
metrics would compare unlike scales; a fixed linear scale keeps the ranking of Delta E across
images, so the pixel metrics are those of Delta E itself. (2) Both the pixel and the median
(each channel's median lies within that channel's range) lie in the box, so no map value can
exceed 1 and nothing is clipped: the map is in [0, 1] as :class:`Prediction` asks.

The image score is the mean of the ``topk`` largest raw map values (default 1: the maximum).
Everything is computed per image, so a map and a score depend neither on the other images of
the batch nor on their order.

>>> round(lab_box_diagonal(), 2)
291.46
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from skimage.color import rgb2lab
from torch import nn

from pfl.clip.backbone import Backbone
from pfl.data.preprocess import denormalize
from pfl.method.contract import Batch, Prediction, TrainingFree


@functools.cache
def lab_box_diagonal() -> float:
    """Diagonal of the bounding box of the sRGB cube in CIELAB (L* 0..100, a* -86.2..98.2,
    b* -107.9..94.5). The extremes of each Lab channel over the cube lie at its corners
    (checked against a 65^3 grid in tests/test_colour.py)."""
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=3)))
    lab = rgb2lab(corners[None])[0]
    return float(np.linalg.norm(lab.max(0) - lab.min(0)))


def colour_distance_maps(rgb: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` RGB in [0, 1] -> ``(N, H, W)`` Delta E (CIE76) from each image's
    per-channel median Lab colour, divided by :func:`lab_box_diagonal` (so in [0, 1])."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"colour_distance_maps takes (N, H, W, 3) RGB, got {rgb.shape}")
    lab = rgb2lab(rgb, channel_axis=-1)
    median = np.median(lab.reshape(len(lab), -1, 3), axis=1)[:, None, None, :]
    return np.linalg.norm(lab - median, axis=-1) / lab_box_diagonal()


@dataclass
class ColourConfig:
    """The colour baseline's one setting."""

    topk: int = 1  # image score: mean of the topk largest map values (1: the map's maximum)


class ColourBaseline(TrainingFree, nn.Module):
    """The colour baseline on the shared harness (:class:`pfl.method.contract.Method`).

    Training-free (like WinCLIP, listed in :data:`pfl.baselines.TRAINING_FREE`): it has no
    parameters, :func:`pfl.run.train.fit` refuses it (no trainable parameters) and
    ``training_step`` says so; evaluate it directly. It reads pixels (``needs_images``), so the
    harness serves ``Batch.images``; the backbone is kept only because the contract names one.

    Args:
        backbone: the frozen tower (unused).
        cfg: :class:`ColourConfig`.
        generator: unused (nothing is drawn); accepted as every peer's constructor takes it.
    """

    name = "colour"
    needs_images = True

    def __init__(self, backbone: Backbone, cfg: ColourConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg or ColourConfig()
        if self.cfg.topk < 1:
            raise ValueError(f"ColourConfig.topk must be >= 1, got {self.cfg.topk}")

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        if batch.images is None:
            raise ValueError("the colour baseline reads pixels: the Batch needs images, not only "
                             "cached feats")
        maps = torch.from_numpy(colour_distance_maps(denormalize(batch.images)))
        maps = maps.to(torch.get_default_dtype())
        flat = maps.reshape(len(maps), -1)
        k = min(self.cfg.topk, flat.shape[1])
        scores = flat.topk(k, dim=1).values.mean(1)
        return Prediction(maps=maps, scores=scores)
