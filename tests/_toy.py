"""A toy :class:`pfl.method.contract.Method` and toy cached features, to test the harness apart from
Bayes-PFL: per-layer linear heads on the patch tokens and a linear head on the global feature.

Toy data: a 4 x 4 patch grid upsampled to 16 px, L = 2 layers of width 8. An anomalous
image has a 2 x 2 block of patches shifted along one fixed direction ``v`` (shared by every
category, so a head trained on some categories transfers to others); every category adds its
own random offset to all of its tokens.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from pfl.clip.backbone import ImageFeatures
from pfl.method.contract import Batch, Prediction, StepLoss
from pfl.run.features import FeatureStore

GRID, SIZE, LAYERS, WIDTH, EMBED = 4, 16, 2, 8, 6


class ToyMethod(nn.Module):
    """Per-layer linear heads on patch tokens; a sigmoid map per layer, averaged."""

    name = "toy"

    def __init__(self, seed: int = 0, noise: float = 0.1, nan_at_call: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = None
        self.heads = nn.Parameter(0.01 * torch.randn(LAYERS, WIDTH, generator=g))
        self.bias = nn.Parameter(torch.zeros(LAYERS))
        self.glob = nn.Parameter(0.01 * torch.randn(EMBED, generator=g))
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.noise = noise
        self.nan_at_call = nan_at_call
        self.calls = 0
        self.seen_classes: set[str] = set()

    def trainable_parameters(self):
        return list(self.parameters())

    def parameter_groups(self):
        return {"prompts": [self.heads], "temperatures": [self.scale],
                "rest": [self.bias, self.glob]}

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_trainable_state_dict(self, state):
        self.load_state_dict(state)

    def _logits(self, feats: ImageFeatures, noise: torch.Tensor | None = None):
        p = feats.patches if noise is None else feats.patches + noise
        lg = torch.einsum("nltw,lw->nlt", p, self.heads) * self.scale + self.bias[:, None]
        lg = lg.reshape(-1, LAYERS, GRID, GRID)
        return F.interpolate(lg, size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        self.calls += 1
        self.seen_classes.update(batch.cls_names)
        feats = batch.feats
        noise = self.noise * torch.randn(feats.patches.shape, generator=generator)
        logits = self._logits(feats, noise)
        target = batch.masks[:, None].expand_as(logits)
        pixel = F.binary_cross_entropy_with_logits(logits, target)
        image = F.binary_cross_entropy_with_logits(feats.global_ @ self.glob,
                                                   batch.labels.float())
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            image = image * float("nan")
        terms = {"pixel": float(pixel.detach()), "image": float(image.detach())}
        return StepLoss(pixel + image, terms)

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        maps = torch.sigmoid(self._logits(batch.feats)).mean(1)
        return Prediction(maps=maps, scores=torch.sigmoid(batch.feats.global_ @ self.glob))


def toy_store(classes, n_per_class: int = 6, seed: int = 0, dataset=None) -> FeatureStore:
    """Half normal, half anomalous images per category (deterministic for ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.ones(WIDTH) / WIDTH**0.5
    u = torch.ones(EMBED) / EMBED**0.5
    glob, patches, masks, labels, names, paths = [], [], [], [], [], []
    for c in classes:
        offset = torch.randn(WIDTH, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
        for i in range(n_per_class):
            y = i % 2
            p = torch.randn(LAYERS, GRID * GRID, WIDTH, generator=g) + 0.3 * offset
            m = torch.zeros(GRID, GRID)
            if y:
                r, q = torch.randint(0, GRID - 1, (2,), generator=g).tolist()
                m[r:r + 2, q:q + 2] = 1
                p[:, m.flatten() > 0] += 2.5 * v
            glob.append(torch.randn(EMBED, generator=g) + 2.0 * y * u)
            patches.append(p)
            masks.append(m.repeat_interleave(SIZE // GRID, 0).repeat_interleave(SIZE // GRID, 1))
            labels.append(y)
            names.append(c)
            paths.append(f"{c}/{i:03d}.png")
    return FeatureStore(
        ImageFeatures(torch.stack(glob), torch.stack(patches)),
        masks=torch.stack(masks).to(torch.uint8), labels=torch.tensor(labels),
        cls_names=names, paths=paths, dataset=dataset,
    )


class RecordingStore:
    """Wraps a :class:`FeatureStore`; records the categories of every batch it serves."""

    def __init__(self, store: FeatureStore, log: set[str]):
        self._store, self.log = store, log

    def __len__(self):
        return len(self._store)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def subset(self, *args, **kwargs):
        return RecordingStore(self._store.subset(*args, **kwargs), self.log)

    def batches(self, *args, **kwargs):
        for b in self._store.batches(*args, **kwargs):
            self.log.update(b.cls_names)
            yield b
