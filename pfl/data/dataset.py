"""One dataset class over ``meta.json`` (docs/reproduction.md, "Data layout"), with its collate.

Every dataset, synthetic or converted from a published layout by :mod:`pfl.data.adapters`, is a
root folder with a ``meta.json``::

    {"train"|"test": {class: [{"img_path", "mask_path", "cls_name", "specie_name",
                               "anomaly"}]},
     "pixel_labels": false}      # optional; only for image-label-only datasets

Paths are relative to the root; ``mask_path`` is ``""`` for normal images and for datasets
without pixel labels (HeadCT, BrainMRI, Br35H), whose pixel metrics are then skipped.

    >>> import tempfile
    >>> from pfl.data.synthetic import SynthConfig, build_benchmark
    >>> root = build_benchmark(tempfile.mkdtemp(), SynthConfig(
    ...     n_test_normal=1, n_test_anomalous=1, n_train_normal=0, n_train_anomalous=0,
    ...     image_size=32, domains=("medical",), workers=1))["medical"]
    >>> ds = AnomalyDataset(root, image_size=28)
    >>> len(ds), ds.classes
    (8, ['cell', 'phantom', 'retina', 'tissue'])
    >>> b = collate([ds[0], ds[1]])
    >>> tuple(b["image"].shape), b["label"].tolist(), b["has_mask"].tolist()
    ((2, 3, 28, 28), [0, 1], [True, True])
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pfl.data.preprocess import image_to_tensor, mask_to_tensor, to_pil_rgb

HOW_TO_BUILD = (
    "build the offline benchmark with `python -m pfl data synth --out DIR`, or write meta.json "
    "for a published dataset with `python -m pfl data convert DATASET --root DIR` "
    "(see `python -m pfl data convert --help` for the datasets it knows)"
)


class BadSampleError(ValueError):
    """A sample of meta.json that cannot be used (unreadable image, missing mask...)."""


def load_meta(root: str | os.PathLike) -> dict:
    """Read ``root/meta.json`` and check its structure (:func:`check_meta`); a missing root or
    file says how to make one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist: {HOW_TO_BUILD}")
    path = root / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {HOW_TO_BUILD}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): rebuild it; {HOW_TO_BUILD}") from e
    check_meta(meta, path)
    return meta


REQUIRED_KEYS = ("img_path", "cls_name", "anomaly")


def check_meta(meta, path: str | os.PathLike = "meta.json") -> None:
    """Raise a ``ValueError`` naming ``path`` and the first wrong entry unless ``meta`` has the
    layout of the module docstring: splits map class names to lists of sample objects with
    ``img_path`` (str), ``cls_name`` and ``anomaly`` (0/1), and an optional ``mask_path`` str.

    >>> try:
    ...     check_meta({"test": [1, 2, 3]}, "x/meta.json")
    ... except ValueError as e:
    ...     print(str(e)[:73])
    x/meta.json: "test" must map class names to lists of samples, got a list;
    """
    fix = f"rebuild it: {HOW_TO_BUILD}"
    if not isinstance(meta, dict) or not ({"train", "test"} & set(meta)):
        raise ValueError(f"{path} has no 'train' or 'test' split: {HOW_TO_BUILD}")
    for split in ("train", "test"):
        classes = meta.get(split, {})
        if not isinstance(classes, dict):
            raise ValueError(f'{path}: "{split}" must map class names to lists of samples, got '
                             f"a {type(classes).__name__}; {fix}")
        for cls, rows in classes.items():
            where = f'{path}: "{split}" / "{cls}"'
            if not isinstance(rows, list):
                raise ValueError(f"{where} must be a list of samples, got a "
                                 f"{type(rows).__name__}; {fix}")
            for i, r in enumerate(rows):
                if not isinstance(r, dict):
                    raise ValueError(f"{where} sample {i} must be an object with "
                                     f"{list(REQUIRED_KEYS)}, got {r!r}; {fix}")
                missing = [k for k in REQUIRED_KEYS if k not in r]
                if missing:
                    raise ValueError(f"{where} sample {i} ({r}) lacks {missing}; {fix}")
                bad = [k for k in ("img_path", "mask_path") if not isinstance(r.get(k, ""), str)]
                if bad or not r["img_path"]:
                    raise ValueError(f"{where} sample {i}: img_path and mask_path must be "
                                     f"strings (relative paths), got {r!r}; {fix}")
                if r["anomaly"] not in (0, 1, True, False):
                    raise ValueError(f"{where} sample {i}: anomaly must be 0 or 1, got "
                                     f"{r['anomaly']!r}; {fix}")


@dataclass
class Augment:
    """Training augmentations, applied to image and mask alike (only when ``augment``)."""

    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    rotate: float = 10.0  # max absolute rotation, degrees (mask: nearest neighbour)
    brightness: float = 0.1  # max relative brightness change
    contrast: float = 0.1  # max relative contrast change


def _read_image(path: Path) -> Image.Image:
    """Open and decode fully (so a truncated file fails here, naming itself)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as e:
        raise BadSampleError(f"image file {path} is missing: fix meta.json or restore the file"
                             ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(
            f"cannot read image {path} ({type(e).__name__}: {e}); re-download or replace the "
            "file, or pass skip_bad=True to skip unreadable images with a warning"
        ) from e


def _image_header(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only: size and mode, no pixel decoding)."""
    try:
        with Image.open(path) as im:
            return im
    except FileNotFoundError as e:
        raise BadSampleError(f"image file {path} is missing: fix meta.json or restore the file"
                             ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(f"cannot read image {path} ({type(e).__name__}: {e}); re-download "
                             "or replace the file, or pass skip_bad=True to skip it") from e


def _mask_size_message(mask: Path, msize, image: Path, isize) -> str:
    return (f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} is "
            f"{isize[0]}x{isize[1]}: replace the mask with one of the image's size (a resized "
            "mask no longer marks the same pixels), skip the sample (skip_bad=True, "
            "--skip-bad), or pass resize_masks=True to resize it")


def check_sample_files(root: str | os.PathLike, img_path: str, mask_path: str = "", *,
                       decode: bool = True, resize_masks: bool = False) -> None:
    """Raise :class:`BadSampleError` naming the file unless the image ``root/img_path`` (and
    the mask ``root/mask_path``, if given) exists and opens (``decode``: decodes fully, so a
    truncated file fails; else the header only) and the mask has the image's size (unless
    ``resize_masks``)."""
    root = Path(root)
    paths = [root / img_path] + ([root / mask_path] if mask_path else [])
    sizes = [(_read_image(p) if decode else _image_header(p)).size for p in paths]
    if len(sizes) == 2 and sizes[0] != sizes[1] and not resize_masks:
        raise BadSampleError(_mask_size_message(paths[1], sizes[1], paths[0], sizes[0]))


def _mask_array(pil: Image.Image) -> np.ndarray:
    """Any mask image (L, 1, P, I;16, RGB) as a 2-D float array; nonzero/bright = anomalous."""
    if pil.mode in ("RGB", "RGBA", "LA"):
        pil = pil.convert("L")
    arr = np.asarray(pil).astype(np.float32)
    return arr if arr.ndim == 2 else arr.max(axis=-1)


class AnomalyDataset(torch.utils.data.Dataset):
    """Samples of one split of a ``meta.json`` dataset.

    ``ds[i]`` is a dict: ``image`` (3, S, S) CLIP-normalised float, ``mask`` (S, S) 0/1 float
    (zeros for normal images and image-label-only data), ``label`` int (1 anomalous),
    ``cls_name``, ``specie_name``, ``path`` (absolute image path) and ``has_mask`` (whether
    the dataset has pixel labels).

    Args:
        root: folder holding ``meta.json``.
        split: "train" or "test".
        classes: subset of class names (None: all, sorted).
        image_size: S.
        augment: False, True (default :class:`Augment`), or an :class:`Augment`.
        skip_bad: check every image up front; unreadable ones (and masks of another size than
            their image) are dropped with one warning and listed in ``bad`` with the reason in
            ``bad_reasons`` (False: such a sample raises when read, naming the file).
        resize_masks: a mask of another size than its image is resized to the image (nearest
            neighbour) with a warning, instead of being an error.
        seed: seed of the augmentations (with the epoch, see ``set_epoch``, and the index).
    """

    def __init__(self, root: str | os.PathLike, split: str = "test",
                 classes: list[str] | tuple[str, ...] | None = None, image_size: int = 224,
                 augment: bool | Augment = False, skip_bad: bool = False, seed: int = 0,
                 resize_masks: bool = False):
        self.root = Path(root)
        self.meta = load_meta(self.root)
        if split not in self.meta:
            have = sorted(k for k in self.meta if k in ("train", "test"))
            raise ValueError(f"{self.root / 'meta.json'} has no split {split!r}; it has {have}")
        self.split = split
        per_class = self.meta[split]
        if classes is None:
            classes = sorted(per_class)
        unknown = [c for c in classes if c not in per_class]
        if unknown:
            raise ValueError(f"classes {unknown} are not in the {split} split of "
                             f"{self.root / 'meta.json'}; it has {sorted(per_class)}")
        self.classes = list(classes)
        self.image_size = image_size
        self.augment = Augment() if augment is True else (augment or None)
        self.seed = seed
        self.resize_masks = resize_masks
        self.epoch = 0
        self.pixel_labels = bool(self.meta.get("pixel_labels", True))
        self.samples: list[dict] = [dict(s) for c in self.classes for s in per_class[c]]
        for s in self.samples:
            missing = {"img_path", "cls_name", "anomaly"} - set(s)
            if missing:
                raise BadSampleError(f"sample {s} of {self.root / 'meta.json'} lacks "
                                     f"{sorted(missing)}: rebuild meta.json")
            s.setdefault("mask_path", "")
            s.setdefault("specie_name", "bad" if s["anomaly"] else "good")
        if self.pixel_labels:
            # A dataset with masks must have one for every anomalous sample, or the pixel
            # metrics would count a whole defect as normal pixels.
            for s in self.samples:
                if int(s["anomaly"]) and not s["mask_path"]:
                    raise BadSampleError(
                        f"anomalous sample {s['img_path']} has no mask_path in "
                        f"{self.root / 'meta.json'}, a dataset with pixel labels: add its "
                        'mask, remove the sample, or set "pixel_labels": false'
                    )
        self.bad: list[str] = []
        self.bad_reasons: dict[str, str] = {}
        if skip_bad:
            self._drop_bad()

    def problems(self, decode: bool = True) -> list[tuple[str, str]]:
        """``(img_path, reason)`` for every sample that cannot be used: a missing or (with
        ``decode``) unreadable image or mask, or a mask of another size than its image (unless
        ``resize_masks``). ``decode=False`` only checks that files exist and reads image
        headers for the sizes: fast enough to run before a model loads."""
        out = []
        for s in self.samples:
            try:
                self._check_sample(s, decode)
            except BadSampleError as e:
                out.append((s["img_path"], str(e)))
        return out

    def _check_sample(self, s: dict, decode: bool) -> None:
        mask = s["mask_path"] if self.pixel_labels else ""
        check_sample_files(self.root, s["img_path"], mask, decode=decode,
                           resize_masks=self.resize_masks)

    def _drop_bad(self) -> None:
        bad = dict(self.problems(decode=True))
        self.bad = [s["img_path"] for s in self.samples if s["img_path"] in bad]
        self.bad_reasons = bad
        if self.bad:
            warnings.warn(f"skipped {len(self.bad)} unreadable sample(s) of {self.root}, e.g. "
                          f"{self.bad[:3]}", stacklevel=3)
        self.samples = [s for s in self.samples if s["img_path"] not in bad]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [int(s["anomaly"]) for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """New augmentation draws each epoch, still reproducible."""
        self.epoch = epoch

    def fingerprint(self) -> dict:
        """What identifies this split's content, for feature caches (pfl.run.features)."""
        h = hashlib.sha256()
        for s in self.samples:
            for rel in (s["img_path"], s["mask_path"]):
                if rel:
                    st = (self.root / rel).stat()
                    h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
        return {"root": str(self.root.resolve()), "split": self.split,
                "image_size": self.image_size, "classes": self.classes,
                "augment": repr(self.augment), "samples": self.samples, "files": h.hexdigest()}

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        path = self.root / s["img_path"]
        img = to_pil_rgb(_read_image(path))
        mask = None
        if s["mask_path"] and self.pixel_labels:
            mpath = self.root / s["mask_path"]
            mpil = _read_image(mpath)
            if mpil.size != img.size:
                if not self.resize_masks:
                    raise BadSampleError(_mask_size_message(mpath, mpil.size, path, img.size))
                warnings.warn(f"mask {mpath} is {mpil.size[0]}x{mpil.size[1]} but its image is "
                              f"{img.size[0]}x{img.size[1]}: resized to the image",
                              stacklevel=2)
                mpil = mpil.resize(img.size, Image.NEAREST)
            mask = Image.fromarray(_mask_array(mpil), "F")
        if self.augment is not None:
            img, mask = self._augment(img, mask, i)
        return {
            "image": image_to_tensor(img, self.image_size),
            "mask": mask_to_tensor(None if mask is None else np.asarray(mask), self.image_size),
            "label": int(s["anomaly"]),
            "cls_name": s["cls_name"],
            "specie_name": s["specie_name"],
            "path": str(path),
            "has_mask": self.pixel_labels,
        }

    def _augment(self, img: Image.Image, mask: Image.Image | None, i: int):
        a = self.augment
        rng = np.random.default_rng([self.seed, self.epoch, i])
        ops = []
        if rng.random() < a.hflip:
            ops.append(lambda im, _: im.transpose(Image.FLIP_LEFT_RIGHT))
        if rng.random() < a.vflip:
            ops.append(lambda im, _: im.transpose(Image.FLIP_TOP_BOTTOM))
        angle = float(rng.uniform(-a.rotate, a.rotate)) if a.rotate else 0.0
        if angle:
            ops.append(lambda im, is_mask: im.rotate(
                angle, Image.NEAREST if is_mask else Image.BILINEAR))
        for op in ops:
            img = op(img, False)
            mask = None if mask is None else op(mask, True)
        x = np.asarray(img, np.float32)
        m = x.mean()
        con = 1 + rng.uniform(-a.contrast, a.contrast)
        gain = 1 + rng.uniform(-a.brightness, a.brightness)
        x = np.clip((m + (x - m) * con) * gain, 0, 255).round().astype(np.uint8)
        return Image.fromarray(x), mask


def collate(batch: list[dict]) -> dict:
    """Stack samples of mixed classes: tensors stacked, names and paths kept as lists.

    ``image`` (N, 3, S, S), ``mask`` (N, S, S), ``label`` (N,) int64, ``has_mask`` (N,) bool.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "has_mask": torch.tensor([bool(b["has_mask"]) for b in batch]),
        "cls_name": [b["cls_name"] for b in batch],
        "specie_name": [b.get("specie_name", "") for b in batch],
        "path": [b["path"] for b in batch],
    }


def meta_counts(root: str | os.PathLike) -> list[dict]:
    """Rows ``{split, class, normal, anomalous}`` of ``root/meta.json`` (no image is read)."""
    meta = load_meta(root)
    rows = []
    for split in ("train", "test"):
        for cls, items in sorted(meta.get(split, {}).items()):
            a = sum(int(s["anomaly"]) for s in items)
            rows.append({"split": split, "class": cls, "normal": len(items) - a,
                         "anomalous": a})
    return rows


def mask_areas(root: str | os.PathLike, split: str = "test") -> list[dict]:
    """Rows ``{class, kind, area}`` for each anomalous sample with a mask: the defect's
    fraction of the image (the mask's foreground share at its own resolution)."""
    root = Path(root)
    rows = []
    for cls, items in sorted(load_meta(root).get(split, {}).items()):
        for s in items:
            if int(s["anomaly"]) and s.get("mask_path"):
                m = _mask_array(_read_image(root / s["mask_path"]))
                rows.append({"class": cls, "kind": s.get("specie_name", ""),
                             "area": float((m > m.max() / 2).mean())})
    return rows
