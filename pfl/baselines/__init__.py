"""Peer methods on the shared harness, by name (docs/reproduction.md, "Peers"; appendix A.2).

Each peer is a :class:`pfl.method.contract.Method`: the same backbone, data, training loop
(:func:`pfl.run.train.fit`) and evaluation serve all, so a comparison differs only in the method.
:data:`REGISTRY` holds the paper's peers; :data:`REFERENCES` holds reference methods that are
no peer of the paper (the colour baseline, :mod:`pfl.baselines.colour`). :func:`build` (and so
:func:`pfl.run.checkpoints.build_method`) finds both.

>>> sorted(REGISTRY), sorted(REFERENCES)
(['adaclip', 'anomalyclip', 'aprilgan', 'clipad', 'winclip'], ['colour'])
>>> REGISTRY["aprilgan"].name, CONFIGS["aprilgan"]().infer_prompts
('APRIL-GAN', 'pe')
"""

from __future__ import annotations

import torch

from pfl.baselines.adaclip import AdaCLIP, AdaCLIPConfig
from pfl.baselines.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from pfl.baselines.aprilgan import AprilGAN, AprilGANConfig
from pfl.baselines.clipad import CLIPAD, CLIPADConfig
from pfl.baselines.colour import ColourBaseline, ColourConfig
from pfl.baselines.winclip import WinCLIP, WinCLIPConfig
from pfl.clip.backbone import Backbone

REGISTRY = {"winclip": WinCLIP, "aprilgan": AprilGAN, "clipad": CLIPAD,
            "anomalyclip": AnomalyCLIP, "adaclip": AdaCLIP}
# Not peers of the paper (so not timed or tabled with them), but built by name all the same.
REFERENCES = {"colour": ColourBaseline}
CONFIGS = {"winclip": WinCLIPConfig, "aprilgan": AprilGANConfig, "clipad": CLIPADConfig,
           "anomalyclip": AnomalyCLIPConfig, "adaclip": AdaCLIPConfig, "colour": ColourConfig}
TRAINING_FREE = frozenset({"winclip", "colour"})  # evaluated without auxiliary training


def build(name: str, backbone: Backbone, cfg=None, generator: torch.Generator | None = None):
    """The peer (or reference method) called ``name`` on ``backbone`` (``cfg``: its config
    dataclass, default if None)."""
    key = name.lower().replace("-", "").replace("_", "")
    methods = REGISTRY | REFERENCES
    if key not in methods:
        raise ValueError(f"unknown peer method {name!r}: choose one of {sorted(methods)}")
    return methods[key](backbone, cfg, generator)


__all__ = ["REGISTRY", "REFERENCES", "CONFIGS", "TRAINING_FREE", "build", "ColourBaseline",
           "ColourConfig", "WinCLIP", "WinCLIPConfig",
           "AprilGAN", "AprilGANConfig", "AnomalyCLIP", "AnomalyCLIPConfig", "CLIPAD",
           "CLIPADConfig", "AdaCLIP", "AdaCLIPConfig"]
