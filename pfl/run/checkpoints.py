"""Run folders: the checkpoint and config files a training run writes, and rebuilding a
method from them (:func:`load_run`), for evaluation, prediction and resumption."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from pfl import baselines
from pfl.clip.backbone import load_backbone
from pfl.config import Profile
from pfl.method.contract import Method
from pfl.method.model import BayesPFL

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"
HISTORY = "history.json"
RESUME = "resume"


def set_mode(method: Method, training: bool) -> None:
    """``method.train(training)`` where the method has it (training-free peers do not)."""
    mode = getattr(method, "train", None)
    if callable(mode):
        mode(training)


def load_checkpoint(method: Method, path: str | Path) -> Method:
    """Load a checkpoint (a run folder or its ``checkpoint.safetensors``) into ``method``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run folder written by "
                                "pfl.run.train.fit (python -m pfl train --out DIR) or its "
                                f"{CHECKPOINT}")
    method.load_trainable_state_dict(load_file(str(path)))
    set_mode(method, False)
    return method


def read_run_config(path: str | Path) -> dict:
    """``config.json`` of a run folder (or of the folder holding a checkpoint file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: a checkpoint needs the config.json "
                                "that pfl.run.train.fit writes beside it")
    return json.loads(cfg_path.read_text())


def build_method(name: str, profile: Profile, backbone=None, model_cfg: Mapping | None = None
                 ) -> Method:
    """A fresh method by name on ``profile``: Bayes-PFL (``profile.model``), or a peer of
    :mod:`pfl.baselines` (its config from ``model_cfg``, e.g. a run's ``config.json``)."""
    backbone = backbone if backbone is not None else load_backbone(profile.backbone)
    if name.lower().replace("_", "-") in ("bayes-pfl", "bayespfl"):
        return BayesPFL(backbone, profile.model, seed=profile.train.seed, train_cfg=profile.train)
    key = name.lower().replace("-", "").replace("_", "")
    cfg = baselines.CONFIGS[key](**model_cfg) if (model_cfg and key in baselines.CONFIGS) else None
    generator = torch.Generator().manual_seed(profile.train.seed)
    return baselines.build(name, backbone, cfg, generator=generator)


def load_run(path: str | Path, backbone=None) -> tuple[Method, Profile]:
    """Rebuild the method of a run folder from its ``config.json`` and load its checkpoint."""
    run = read_run_config(path)
    if run.get("profile") is None:
        raise ValueError(f"{path} was trained without a profile in config.json; rebuild the "
                         "method yourself and call pfl.run.checkpoints.load_checkpoint")
    profile = Profile.from_dict(run["profile"])
    model_cfg = None if run["method"].lower().startswith("bayes") else run.get("model")
    method = build_method(run["method"], profile, backbone, model_cfg)
    return load_checkpoint(method, path), profile

