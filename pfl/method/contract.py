"""The contract every anomaly-detection method in pfl meets, so one harness trains and scores all.

Bayes-PFL (:mod:`pfl.method.model`) and the peers (:mod:`pfl.baselines`) differ only in the method:
the data, the frozen backbone, the training loop (:func:`pfl.run.train.fit`) and the evaluation
(:mod:`pfl.run.evaluate`) are shared. A method sees a :class:`Batch`; because the image tower is
frozen, its features can be computed once and cached (``Batch.feats``), and a method that needs
pixels (WinCLIP's windows, AdaCLIP's visual prompts) reads ``Batch.images`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from pfl.clip.backbone import Backbone, ImageFeatures


@dataclass
class Batch:
    """One batch. images: (N, 3, S, S) CLIP-normalised, or None when only features are cached;
    feats: the frozen tower's output for those images, or None; masks: (N, S, S) in {0, 1};
    labels: (N,) 0 normal / 1 anomalous; cls_names: N category names."""

    cls_names: list[str]
    images: torch.Tensor | None = None
    feats: ImageFeatures | None = None
    masks: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    paths: list[str] = field(default_factory=list)

    def features(self, backbone: Backbone) -> ImageFeatures:
        """Cached features, else encode the images now (and keep them)."""
        if self.feats is None:
            if self.images is None:
                raise ValueError("a Batch needs images or cached feats")
            self.feats = backbone.encode_image(self.images)
        return self.feats

    def __len__(self) -> int:
        return len(self.cls_names)


@dataclass(frozen=True)
class Shard:
    """This process's rows ``start:stop`` of a global training batch of ``total`` images
    (DDP, :mod:`pfl.run.distributed`): a method that takes ``training_step(..., shard=)``
    draws its randomness for all ``total`` images, as one process would, and keeps these
    rows; its loss is the mean over its own rows."""

    start: int
    stop: int
    total: int


@dataclass
class Prediction:
    """maps: (N, S, S) abnormal probability at the input resolution, before smoothing;
    scores: (N,) the method's own image-level abnormal score; map_std: (N, S, S) optional
    per-pixel uncertainty (Bayes-PFL: standard deviation over its Monte Carlo samples of the
    per-sample map, when asked for), else None."""

    maps: torch.Tensor
    scores: torch.Tensor
    map_std: torch.Tensor | None = None


@dataclass
class StepLoss:
    """One training step: the differentiable ``total`` and every term as a float, by name."""

    total: torch.Tensor
    terms: dict[str, float]


@runtime_checkable
class Method(Protocol):
    """What :func:`pfl.run.train.fit` and :mod:`pfl.run.evaluate` need from a method.

    A method that draws Monte Carlo samples (Bayes-PFL) sets ``takes_n_samples = True`` and
    accepts ``predict(batch, generator, n_samples=R)``; the evaluation then passes
    ``EvalConfig.mc_samples`` to it.
    Two optional hooks let :mod:`pfl.run.distributed` split work over processes with the
    numbers of one process: ``training_step(batch, generator, shard=Shard)`` and
    ``skip_predict(n_images, generator)`` (advance the generator as ``predict`` would).
    """

    name: str
    backbone: Backbone

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss: ...

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction: ...


class TrainingFree:
    """Mixin for a method with nothing to train (WinCLIP, the colour baseline): no parameters,
    an empty state, and :meth:`training_step` refuses with the method's ``name``."""

    name: str

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} is training-free; got a state with keys "
                             f"{sorted(state)}")

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        raise RuntimeError(f"{self.name} is training-free: evaluate it directly, not with fit()")
