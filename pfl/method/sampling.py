"""Where Bayes-PFL's randomness comes from: one noise stream per image, seeded by the image.

docs/reproduction.md, "Prompt flow": every image draws R standard-normal vectors for the
ISD flow and R for each IAD flow (normal, abnormal). This module decides which numbers those
are, and nothing else (the flows turn them into prompt offsets, :mod:`pfl.method.flows`).

* **One mechanism** (:func:`draw_noise`): the noise of image n comes from its own
  ``torch.Generator`` seeded with ``seeds[n]``, drawn in float64 and cast to the model's dtype.
  Image n's numbers therefore depend on ``seeds[n]`` alone, never on the batch size, its
  position or its neighbours. (float64 also avoids torch's vectorised float32 normal kernel,
  whose last bits depend on the CPU's instruction set.)
* **Seeds from the content** (:func:`image_seeds`): at inference an image's seed is
  ``derive_seed(seed, key)``, ``seed`` the run's seed and ``key`` a hash of the image's pixels
  (:attr:`pfl.clip.backbone.ImageFeatures.image_keys`). The same image therefore gets the same
  noise, so the same map and score, whatever it is scored with, in any order.
* **Shared IAD noise** (the authors' inference, ``ModelConfig.share_iad_samples``): the IAD
  noise of every image is the IAD part of the stream of the run's seed itself, so all images of
  a run share it without any state kept between calls.

>>> a = draw_noise([7, 8], (3, 4))
>>> b = draw_noise([8], (3, 4))
>>> tuple(a.shape), torch.equal(a[1], b[0])
((2, 3, 4), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pfl.clip.backbone import ImageFeatures
from pfl.utils import SEED_HIGH, content_keys, derive_seed


def draw_seeds(n: int, generator: torch.Generator | None = None) -> list[int]:
    """``n`` seeds in ``[0, 2^62)`` from ``generator`` (None: torch's global RNG).

    The k-th seed is the k-th draw of the stream, so the first seeds do not depend on ``n``.
    """
    return torch.randint(SEED_HIGH, (n,), generator=generator).tolist()


def draw_noise(seeds: Sequence[int], shape: Sequence[int], *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """Standard-normal noise ``(N, *shape)``: row n from its own generator seeded ``seeds[n]``.

    Drawn in float64 on the CPU, then cast to ``dtype`` (default: torch's default dtype) and
    moved to ``device``.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)),
                        dtype=torch.float64) for s in seeds]
    if not rows:
        return torch.empty(0, *shape, dtype=dtype, device=device)
    return torch.stack(rows).to(device=device, dtype=dtype or torch.get_default_dtype())


def feature_keys(feats: ImageFeatures) -> list[int]:
    """One content key per image: ``feats.image_keys``, else a hash of each global feature.

    The fallback (for features built by hand) is exact for the given tensor but, unlike the
    pixel hash, not portable: a tower run on another CPU may change a feature's last bit.
    """
    keys = feats.image_keys if feats.image_keys is not None else content_keys(feats.global_)
    return [int(k) for k in keys]


def image_seeds(seed: int, keys: Sequence[int]) -> list[int]:
    """Each image's seed from the run's ``seed`` and the image's content ``key``."""
    return [derive_seed(seed, "image", int(k)) for k in keys]


@dataclass
class PromptNoise:
    """The noise of one forward pass (R samples, N images, width D).

    Attributes:
        isd: ``(R, N, D)`` for the ISD flow.
        iad: ``(2, R, N or 1, D)`` for the IAD flows (normal, abnormal); one column when shared.
        seeds: the N per-image seeds.
        base: the run's (or step's) seed; the shared IAD noise comes from it.
    """

    isd: Tensor
    iad: Tensor
    seeds: list[int]
    base: int


def prompt_noise(feats: ImageFeatures, n_samples: int, dim: int, *, seed: int | None = None,
                 seeds: Sequence[int] | Tensor | None = None,
                 generator: torch.Generator | None = None, share_iad: bool = False,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> PromptNoise:
    """The ISD and IAD noise of a batch (see the module docstring).

    Args:
        feats: the batch's image features (their ``image_keys`` name the images).
        n_samples: R.
        dim: D.
        seed: the run's seed; image n's seed is ``derive_seed(seed, key_n)``.
        seeds: one seed per image, used as given instead (then ``seed`` defaults to
            ``seeds[0]``, which only matters for the shared IAD noise).
        generator: when neither is given, ``seed`` is drawn from it (one draw; training).
        share_iad: the IAD noise of every image is that of ``seed``'s own stream.
    """
    n = feats.global_.shape[0]
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {n} images; give one each")
    if seed is None:
        seed = seeds[0] if seeds else draw_seeds(1, generator)[0]
    if seeds is None:
        seeds = image_seeds(seed, feature_keys(feats))
    # per image one (3, R, D) block: ISD, IAD normal, IAD abnormal -> (3, R, N, D)
    block = draw_noise(seeds, (3, n_samples, dim), dtype=dtype, device=device).permute(1, 2, 0, 3)
    iad = block[1:]
    if share_iad:
        iad = draw_noise([seed], (3, n_samples, dim), dtype=dtype, device=device)
        iad = iad.permute(1, 2, 0, 3)[1:]
    return PromptNoise(isd=block[0], iad=iad, seeds=seeds, base=int(seed))
