"""Peer methods on the shared harness, by name (docs/reproduction.md, "Peers"; appendix A.2).

Each peer is a :class:`pfl.method.contract.Method`: the same backbone, data, training loop
(:func:`pfl.run.train.fit`) and evaluation serve all, so a comparison differs only in the method.

>>> sorted(REGISTRY)
['adaclip', 'anomalyclip', 'aprilgan', 'clipad', 'winclip']
>>> REGISTRY["aprilgan"].name, CONFIGS["aprilgan"]().infer_prompts
('APRIL-GAN', 'pe')
"""

from __future__ import annotations

import torch

from pfl.baselines.adaclip import AdaCLIP, AdaCLIPConfig
from pfl.baselines.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from pfl.baselines.aprilgan import AprilGAN, AprilGANConfig
from pfl.baselines.clipad import CLIPAD, CLIPADConfig
from pfl.baselines.winclip import WinCLIP, WinCLIPConfig
from pfl.clip.backbone import Backbone

REGISTRY = {"winclip": WinCLIP, "aprilgan": AprilGAN, "clipad": CLIPAD,
            "anomalyclip": AnomalyCLIP, "adaclip": AdaCLIP}
CONFIGS = {"winclip": WinCLIPConfig, "aprilgan": AprilGANConfig, "clipad": CLIPADConfig,
           "anomalyclip": AnomalyCLIPConfig, "adaclip": AdaCLIPConfig}
TRAINING_FREE = frozenset({"winclip"})  # peers evaluated without auxiliary training


def build(name: str, backbone: Backbone, cfg=None, generator: torch.Generator | None = None):
    """The peer called ``name`` on ``backbone`` (``cfg``: its config dataclass, default if None)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise ValueError(f"unknown peer method {name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[key](backbone, cfg, generator)


__all__ = ["REGISTRY", "CONFIGS", "TRAINING_FREE", "build", "WinCLIP", "WinCLIPConfig",
           "AprilGAN", "AprilGANConfig", "AnomalyCLIP", "AnomalyCLIPConfig", "CLIPAD",
           "CLIPADConfig", "AdaCLIP", "AdaCLIPConfig"]
