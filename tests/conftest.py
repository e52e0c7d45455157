"""Shared test fixtures: tiny seeded models (no downloads, STYLE.md habit 5)."""

import pytest

from pfl.backbone import Backbone
from pfl.config import BackboneConfig


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The random-init ``pfl-tiny`` CLIP at 112 px (8 x 8 patches, 4 tapped layers), frozen."""
    return Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=112))
