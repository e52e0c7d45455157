"""Shared test fixtures and helpers: tiny seeded models (no downloads, STYLE.md habit 5)."""

import pytest
import torch

from pfl.clip.backbone import Backbone
from pfl.config import BackboneConfig

# tests/lab/check_lab.py is a script (make check-lab), not a test module.
collect_ignore = ["lab"]


@pytest.fixture(autouse=True)
def _float32_default():
    """Tests run in torch's float32 default; a test that calls ``pfl.setup("smoke")`` (float64)
    must not leak it into the next test."""
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The shipped ``pfl-tiny`` CLIP at 112 px (8 x 8 patches, 4 tapped layers), frozen."""
    return Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=112))


def adam_steps(method, batch, steps: int, lr: float, generator: torch.Generator) -> list[float]:
    """Train ``method`` for ``steps`` Adam steps on one fixed batch; the total loss per step."""
    opt = torch.optim.Adam(list(method.trainable_parameters()), lr=lr)
    method.train(True)
    losses = []
    for _ in range(steps):
        loss = method.training_step(batch, generator)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(float(loss.total.detach()))
    return losses


def random_image_features(backbone: Backbone, n: int, seed: int = 0):
    """``backbone``'s features of ``n`` seeded random images (no gradients)."""
    S = backbone.image_size
    images = torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone.encode_image(images)
