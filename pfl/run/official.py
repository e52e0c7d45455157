"""Import the authors' released Bayes-PFL checkpoint into a ``pfl`` run folder.

``python -m pfl import-official CHECKPOINT --out DIR`` calls :func:`import_official`. The
authors' ``train.py`` saves ``{'MyModel': state_dict}`` with ``torch.save``; every tensor their
forward pass reads is mapped to ``pfl``'s parameters (:func:`pfl.method.official.key_map`),
the reconstruction path (decoders, ``p_mu``) is dropped, and the result is written as a run
folder exactly like :func:`pfl.run.train.fit` writes one (``checkpoint.safetensors`` +
``config.json`` with the :func:`pfl.config.official` preset), so ``pfl evaluate`` and
``pfl predict`` use it like any other run.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pfl.clip.backbone import Backbone, create_clip
from pfl.config import Profile, official
from pfl.method.model import BayesPFL
from pfl.method.official import check_keys, convert_state_dict
from pfl.run.checkpoints import CHECKPOINT, CONFIG
from pfl.utils import atomic_write, atomic_write_json


@dataclass
class ImportReport:
    """What :func:`import_official` did: the run folder, the tensors mapped, the authors'
    keys left out (unused reconstruction path and repeated aliases), how the file was read."""

    out_dir: Path
    mapped: int
    dropped: list[str]
    weights_only: bool
    stage: int

    def summary(self) -> str:
        unused = [k for k in self.dropped if ".encoder." not in k]
        aliases = len(self.dropped) - len(unused)
        how = ("torch.load(weights_only=True)" if self.weights_only else
               "torch.load(weights_only=False): the file holds more than tensors; load only "
               "files you trust")
        return (f"read with {how}; mapped {self.mapped} tensors; dropped {len(unused)} unused "
                f"tensors of the reconstruction path (decoders, p_mu) and {aliases} repeated "
                f"names of shared encoders; image score of stage {self.stage}; run folder "
                f"{self.out_dir}")


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The authors' ``MyModel`` state dict from ``path`` and whether ``weights_only`` sufficed.

    ``torch.load(weights_only=True)`` first (no code runs while reading); a file that needs
    more falls back to a full unpickle, which is reported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the authors' released .pth "
                                "(their train.py saves {'MyModel': state_dict})")
    try:
        obj, safe = torch.load(path, map_location="cpu", weights_only=True), True
    except pickle.UnpicklingError:
        obj, safe = torch.load(path, map_location="cpu", weights_only=False), False
    if isinstance(obj, dict) and "MyModel" in obj:
        obj = obj["MyModel"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (expected {{'MyModel': "
                         "state_dict}} as the authors' train.py saves it)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, safe


def import_official(checkpoint: str | Path, out_dir: str | Path, *,
                    profile: Profile | None = None, backbone=None,
                    stage: int = 2) -> ImportReport:
    """Write a ``pfl`` run folder holding the authors' parameters from ``checkpoint``.

    Args:
        checkpoint: the authors' ``.pth``.
        out_dir: run folder to write (``checkpoint.safetensors``, ``config.json``).
        profile: the run's profile (default :func:`pfl.config.official`, the paper backbone);
            its model config must match the checkpoint's sizes (B, P, Q, K, layers).
        backbone: a :class:`pfl.clip.backbone.Backbone` to build the model on (default: load
            the profile's; only its sizes are used).
        stage: image score of the second stage (2, their ``test.py`` default) or the first.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    profile = profile or official()
    theirs, safe = read_official_checkpoint(checkpoint)
    check_keys(theirs, str(checkpoint))  # before building a model: a bad file fails fast
    has_head = any(k.startswith(("fuse.", "image_mapping.")) for k in theirs)
    if has_head != profile.model.second_stage:
        profile = profile.replace(model={"second_stage": has_head})
    if backbone is None:  # only the tower's sizes matter here: no weights file needed
        backbone = Backbone(create_clip(profile.backbone, load=False), profile.backbone.layers)
    model = BayesPFL(backbone, profile.model, seed=profile.train.seed, train_cfg=profile.train)
    state, dropped = convert_state_dict(theirs, model.trainable_state_dict(), str(checkpoint))
    if "image_stage" in state:
        state["image_stage"] = torch.tensor(stage if has_head else 1)
    model.load_trainable_state_dict(state)  # checks the key set once more
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    atomic_write(out / CHECKPOINT, lambda p: save_file(
        tensors, p, metadata={"method": model.name, "source": Path(checkpoint).name}))
    atomic_write_json(out / CONFIG, {
        "method": model.name,
        "train": dataclasses.asdict(profile.train),
        "model": dataclasses.asdict(profile.model),
        "profile": profile.to_dict(),
        "imported_from": str(Path(checkpoint).name),
    })
    mapped = len(theirs) - len(dropped)
    return ImportReport(out, mapped, dropped, safe, stage if has_head else 1)
