"""Adapters from the paper's 15 datasets' published folder layouts to ``meta.json``.

One registry, :data:`ADAPTERS`; each adapter is a scan function that walks a layout and
returns meta.json entries (docs/reproduction.md, "Data layout"; appendix Section C). ``convert(name,
root)`` writes ``root/meta.json`` (or one in ``out``, with paths relative to it), which
``AnomalyDataset`` then reads. Datasets without pixel labels (HeadCT, BrainMRI,
Br35H) get ``"pixel_labels": false`` and empty mask paths, so pixel metrics skip them.

Where the paper's authors used a curated copy (AdaCLIP's or AnomalyCLIP's, often in the MVTec
layout), convert it with ``mvtec`` or ``folder``. Deviations, named: KSDD2 follows the paper
(all anomalous images of both splits plus as many seeded-random normal ones, ``balanced``);
RSDD and DAGM are taken whole as published (the paper crops RSDD to 512 px and re-annotates
DAGM's ellipses), with labels from their masks.

    >>> sorted(ADAPTERS)[:5]
    ['br35h', 'brainmri', 'btad', 'clinicdb', 'colondb']
    >>> adapter("CVC-ClinicDB").name, adapter("MVTec-AD").name
    ('clinicdb', 'mvtec')
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pfl.utils import atomic_write_json

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_DIR_NAMES = ("ground_truth", "masks", "mask", "gt", "label", "labels")


@dataclass(frozen=True)
class Adapter:
    """How to read one published layout."""

    name: str  # registry key
    title: str  # the dataset's published name
    domain: str  # "industrial" | "medical" | "any"
    pixel_labels: bool  # False: image labels only (pixel metrics skipped)
    layout: str  # the expected layout, shown in errors and --help
    scan: Callable[[Path], dict[str, dict[str, list[dict]]]]  # root -> {split: {cls: [...]}}


# --------------------------------------------------------------------------- helpers


def _images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; case-insensitive extensions)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _child(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively (published trees mix Train/train)."""
    for p in _subdirs(folder):
        if p.name.lower() == name.lower():
            return p
    return None


def _find_dir(root: Path, names: tuple[str, ...], depth: int = 2) -> Path | None:
    """The first folder named one of ``names`` at ``root`` or up to ``depth`` levels below."""
    frontier = [root]
    for _ in range(depth + 1):
        for d in frontier:
            for n in names:
                c = _child(d, n)
                if c is not None:
                    return c
        frontier = [s for d in frontier for s in _subdirs(d)]
    return None


def _find_mask(mask_dir: Path | None, stem: str,
               suffixes: tuple[str, ...] = ("", "_mask", "_gt", "_label", "_segmentation"),
               prefixes: tuple[str, ...] = ("",)) -> Path | None:
    """The mask of image ``stem`` in ``mask_dir``: same stem (+ suffix), any image extension."""
    if mask_dir is None:
        return None
    wanted = {(p + stem + s).lower() for p in prefixes for s in suffixes}
    for m in _images(mask_dir):
        if m.stem.lower() in wanted:
            return m
    return None


def _mask_positive(path: Path) -> bool:
    with Image.open(path) as im:
        return bool(np.asarray(im.convert("L")).max() > 0)


def _entry(img: Path, mask: Path | None, cls: str, specie: str, anomaly: int) -> dict:
    """One meta.json sample; paths absolute here, made relative by :func:`convert`."""
    return {"img_path": str(img), "mask_path": str(mask) if mask else "", "cls_name": cls,
            "specie_name": specie, "anomaly": int(anomaly)}


def _need(cond: bool, what: str, layout: str) -> None:
    if not cond:
        raise FileNotFoundError(f"{what}; expected layout:\n{layout}")


# --------------------------------------------------------------------------- scanners


def _scan_mvtec_like(root: Path, good: str, layout: str) -> dict:
    """MVTec-like: ``<cls>/train/<good>/``, ``<cls>/test/{<good>,<defect>}/``, masks in
    ``<cls>/ground_truth/<defect>/``."""
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for cdir in _subdirs(root):
        test = _child(cdir, "test")
        if test is None:
            continue
        cls = cdir.name
        train_good = _child(_child(cdir, "train") or cdir / "_", good)
        if train_good is not None:
            meta["train"][cls] = [_entry(p, None, cls, "good", 0) for p in _images(train_good)]
        gt = _child(cdir, "ground_truth")
        rows = []
        for sdir in _subdirs(test):
            anomalous = sdir.name.lower() != good.lower()
            specie = sdir.name if anomalous else "good"
            for p in _images(sdir):
                mask = _find_mask(_child(gt, sdir.name) if gt else None, p.stem)
                if anomalous and mask is None:
                    raise FileNotFoundError(
                        f"no mask for anomalous image {p} in {cdir}/ground_truth/{sdir.name}/ "
                        f"(looked for {p.stem}[_mask].*); expected layout:\n{layout}")
                rows.append(_entry(p, mask if anomalous else None, cls, specie, int(anomalous)))
        meta["test"][cls] = rows
    _need(bool(meta["test"]), f"no <class>/test/ folders under {root}", layout)
    return meta


MVTEC_LAYOUT = """  <root>/<class>/train/good/*.png
  <root>/<class>/test/{good,<defect>}/*.png
  <root>/<class>/ground_truth/<defect>/<name>_mask.png"""

BTAD_LAYOUT = """  <root>/{01,02,03}/train/ok/*.bmp|png
  <root>/{01,02,03}/test/{ok,ko}/*.bmp|png
  <root>/{01,02,03}/ground_truth/ko/<name>.png|bmp"""

DTD_LAYOUT = """  <root>/<class>/train/good/*.png
  <root>/<class>/test/{good,bad}/*.png
  <root>/<class>/ground_truth/bad/<name>[_mask].png"""


def _scan_mvtec(root: Path) -> dict:
    return _scan_mvtec_like(root, "good", MVTEC_LAYOUT)


def _scan_btad(root: Path) -> dict:
    return _scan_mvtec_like(root, "ok", BTAD_LAYOUT)


def _scan_dtd(root: Path) -> dict:
    return _scan_mvtec_like(root, "good", DTD_LAYOUT)


VISA_LAYOUT = """  <root>/split_csv/1cls.csv  (columns object,split,label,image,mask)
  <root>/<class>/Data/Images/{Normal,Anomaly}/*.JPG
  <root>/<class>/Data/Masks/Anomaly/*.png"""


def _scan_visa(root: Path) -> dict:
    csv_path = root / "split_csv" / "1cls.csv"
    _need(csv_path.is_file(), f"{csv_path} is missing", VISA_LAYOUT)
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            anomalous = row["label"].lower() == "anomaly"
            img = root / row["image"]
            mask = root / row["mask"] if row.get("mask") else None
            if anomalous and mask is None:
                raise FileNotFoundError(f"{csv_path}: anomalous image {row['image']} has no mask")
            split = row["split"].lower()
            meta.setdefault(split, {}).setdefault(row["object"], []).append(
                _entry(img, mask, row["object"], "bad" if anomalous else "good", int(anomalous)))
    return meta


KSDD2_LAYOUT = """  <root>/{train,test}/<id>.png
  <root>/{train,test}/<id>_GT.png   (the mask; empty for normal images)"""


def _scan_ksdd2(root: Path, balanced: bool = True, seed: int = 0) -> dict:
    """All images with their GT; ``balanced`` (the paper): all anomalous + as many normal."""
    normal, anomalous = [], []
    for split in ("train", "test"):
        d = _child(root, split)
        for p in _images(d) if d else []:
            if p.stem.lower().endswith("_gt"):
                continue
            gt = _find_mask(d, p.stem, suffixes=("_gt",))
            _need(gt is not None, f"no {p.stem}_GT mask beside {p}", KSDD2_LAYOUT)
            (anomalous if _mask_positive(gt) else normal).append((p, gt))
    _need(bool(normal or anomalous), f"no KSDD2 images under {root}/{{train,test}}",
          KSDD2_LAYOUT)
    if balanced and len(normal) > len(anomalous):
        pick = np.random.default_rng(seed).choice(len(normal), len(anomalous), replace=False)
        normal = [normal[i] for i in sorted(pick)]
    rows = [_entry(p, None, "commutator", "good", 0) for p, _ in normal]
    rows += [_entry(p, gt, "commutator", "defect", 1) for p, gt in anomalous]
    return {"train": {}, "test": {"commutator": rows}}


RSDD_LAYOUT = """  <root>/Type-I RSDDs dataset/{Rail surface images,GroundTruth}/*.jpg|png
  <root>/Type-II RSDDs dataset/{Rail surface images,GroundTruth}/*.jpg|png"""


def _scan_rsdd(root: Path) -> dict:
    """Whole published images; label = mask has defect pixels (the paper crops to 512 px)."""
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for tdir in _subdirs(root):
        m = re.search(r"type[-_ ]?(ii|i|2|1)\b", tdir.name.lower())
        if not m:
            continue
        cls = "heavy_rail" if m.group(1) in ("ii", "2") else "express_rail"
        imgs = next((d for d in _subdirs(tdir) if "image" in d.name.lower()), None)
        gts = next((d for d in _subdirs(tdir) if "ground" in d.name.lower()
                    or d.name.lower() in MASK_DIR_NAMES), None)
        _need(imgs is not None and gts is not None, f"{tdir} lacks its image or GroundTruth "
              "folder", RSDD_LAYOUT)
        rows = []
        for p in _images(imgs):
            gt = _find_mask(gts, p.stem)
            _need(gt is not None, f"no ground truth for {p} in {gts}", RSDD_LAYOUT)
            pos = _mask_positive(gt)
            rows.append(_entry(p, gt if pos else None, cls, "defect" if pos else "good", pos))
        meta["test"][cls] = rows
    _need(bool(meta["test"]), f"no Type-I/Type-II folders under {root}", RSDD_LAYOUT)
    return meta


DAGM_LAYOUT = """  <root>/Class<k>/{Train,Test}/<id>.PNG
  <root>/Class<k>/{Train,Test}/Label/<id>_label.PNG  (defective images only)"""


def _scan_dagm(root: Path) -> dict:
    """Train and Test of each class, all in the test split (the paper uses them all)."""
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for cdir in _subdirs(root):
        m = re.fullmatch(r"class(\d+)", cdir.name.lower())
        if not m:
            continue
        cls = f"texture{int(m.group(1))}"
        rows = []
        for split in ("Train", "Test"):
            sdir = _child(cdir, split)
            if sdir is None:
                continue
            label_dir = _child(sdir, "Label")
            for p in _images(sdir):
                mask = _find_mask(label_dir, p.stem, suffixes=("_label",))
                rows.append(_entry(p, mask, cls, "defect" if mask else "good", int(bool(mask))))
        if rows:
            meta["test"][cls] = rows
    _need(bool(meta["test"]), f"no Class<k>/{{Train,Test}} folders under {root}", DAGM_LAYOUT)
    return meta


HEADCT_LAYOUT = """  <root>/labels.csv  (columns id, hemorrhage: 0 normal / 1 anomalous)
  <root>/head_ct/<id:03d>.png   (also <root>/head_ct/head_ct/)"""


def _scan_headct(root: Path) -> dict:
    csv_path = next(iter(sorted(root.rglob("labels.csv"))), None)
    img_dir = _find_dir(root, ("head_ct",))
    if img_dir is not None and _child(img_dir, "head_ct") is not None:
        img_dir = _child(img_dir, "head_ct")
    _need(csv_path is not None and img_dir is not None,
          f"labels.csv or head_ct/ missing under {root}", HEADCT_LAYOUT)
    by_stem = {p.stem: p for p in _images(img_dir)}
    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            stem = f"{int(row['id']):03d}"
            _need(stem in by_stem, f"{csv_path} lists id {row['id']} but {img_dir}/{stem}.png "
                  "is missing", HEADCT_LAYOUT)
            a = int(row["hemorrhage"])
            rows.append(_entry(by_stem[stem], None, "head_ct", "hemorrhage" if a else "good", a))
    return {"train": {}, "test": {"head_ct": rows}}


YESNO_LAYOUT = """  <root>/no/*.jpg|png   (normal)
  <root>/yes/*.jpg|png  (anomalous; any other folder, e.g. Br35H's pred/, is ignored)"""


def _scan_yes_no(root: Path, cls: str) -> dict:
    no, yes = _find_dir(root, ("no",)), _find_dir(root, ("yes",))
    _need(no is not None and yes is not None, f"no/ and yes/ folders not found under {root}",
          YESNO_LAYOUT)
    rows = [_entry(p, None, cls, "good", 0) for p in _images(no)]
    rows += [_entry(p, None, cls, "tumor", 1) for p in _images(yes)]
    return {"train": {}, "test": {cls: rows}}


def _scan_pairs(root: Path, cls: str, image_dirs: tuple[str, ...], mask_dirs: tuple[str, ...],
                layout: str, suffixes: tuple[str, ...] = ("", "_mask", "_segmentation")
                ) -> dict:
    """Anomalous images only, each with its mask: the medical segmentation sets."""
    imgs, masks = _find_dir(root, image_dirs), _find_dir(root, mask_dirs)
    _need(imgs is not None and masks is not None and imgs != masks,
          f"image folder {image_dirs} or mask folder {mask_dirs} not found under {root}", layout)
    rows = []
    for p in _images(imgs):
        m = _find_mask(masks, p.stem, suffixes=suffixes)
        _need(m is not None, f"no mask for {p} in {masks}", layout)
        rows.append(_entry(p, m, cls, "lesion", 1))
    _need(bool(rows), f"no images in {imgs}", layout)
    return {"train": {}, "test": {cls: rows}}


ISIC_LAYOUT = """  <root>/ISBI2016_ISIC_Part1_Test_Data/ISIC_<id>.jpg
  <root>/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_<id>_Segmentation.png"""
COLON_LAYOUT = """  <root>/images/<name>.png|jpg|tif
  <root>/masks/<name>.png|jpg|tif   (also Original/ + "Ground Truth"/ as CVC-ClinicDB ships)"""
KVASIR_LAYOUT = """  <root>/images/<name>.jpg
  <root>/masks/<name>.jpg   (Kvasir-SEG, HyperKvasir's segmented-images, EndoTect)"""

_IMG_DIRS = ("images", "image", "Original", "imgs")
_MASK_DIRS = ("masks", "mask", "Ground Truth", "GroundTruth", "gt", "labels")


def _scan_isic(root: Path) -> dict:
    imgs = next((d for d in sorted(root.rglob("*")) if d.is_dir()
                 and d.name.lower().endswith("test_data")), None)
    masks = next((d for d in sorted(root.rglob("*")) if d.is_dir()
                  and d.name.lower().endswith("groundtruth")), None)
    if imgs is None or masks is None:  # a curated copy with images/ and masks/
        return _scan_pairs(root, "skin", _IMG_DIRS, _MASK_DIRS, ISIC_LAYOUT)
    return _scan_pairs(imgs.parent, "skin", (imgs.name,), (masks.name,), ISIC_LAYOUT)


# --------------------------------------------------------------------------- folder


FOLDER_LAYOUT = """  <root>/good/*                       normal images
  <root>/<defect>/*                   anomalous images, one folder per defect type
  <root>/masks/<defect>/<name>[_mask].png   optional masks (or ground_truth/)
  or one such folder per class: <root>/<class>/good/ ..."""


def _scan_folder(root: Path) -> dict:
    """A user's own data: one class (``good/`` at the root) or one per subfolder."""
    classes = [root] if _child(root, "good") else [d for d in _subdirs(root) if _child(d, "good")]
    _need(bool(classes), f"no good/ folder at {root} or in its subfolders", FOLDER_LAYOUT)
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for cdir in classes:
        cls = cdir.name
        mroot = next((c for n in MASK_DIR_NAMES if (c := _child(cdir, n)) is not None), None)
        rows = [_entry(p, None, cls, "good", 0) for p in _images(_child(cdir, "good"))]
        for sdir in _subdirs(cdir):
            if sdir.name.lower() == "good" or sdir == mroot:
                continue
            mdir = _child(mroot, sdir.name) if mroot else None
            for p in _images(sdir):
                rows.append(_entry(p, _find_mask(mdir, p.stem), cls, sdir.name, 1))
        meta["test"][cls] = rows
    return meta


# --------------------------------------------------------------------------- registry


def _reg(*adapters: Adapter) -> dict[str, Adapter]:
    return {a.name: a for a in adapters}


ADAPTERS: dict[str, Adapter] = _reg(
    Adapter("mvtec", "MVTec-AD", "industrial", True, MVTEC_LAYOUT, _scan_mvtec),
    Adapter("visa", "VisA", "industrial", True, VISA_LAYOUT, _scan_visa),
    Adapter("btad", "BTAD", "industrial", True, BTAD_LAYOUT, _scan_btad),
    Adapter("ksdd2", "KSDD2", "industrial", True, KSDD2_LAYOUT, _scan_ksdd2),
    Adapter("rsdd", "RSDD", "industrial", True, RSDD_LAYOUT, _scan_rsdd),
    Adapter("dagm", "DAGM", "industrial", True, DAGM_LAYOUT, _scan_dagm),
    Adapter("dtd", "DTD-Synthetic", "industrial", True, DTD_LAYOUT, _scan_dtd),
    Adapter("headct", "HeadCT", "medical", False, HEADCT_LAYOUT, _scan_headct),
    Adapter("brainmri", "BrainMRI", "medical", False, YESNO_LAYOUT,
            lambda r: _scan_yes_no(r, "brain_mri")),
    Adapter("br35h", "Br35H", "medical", False, YESNO_LAYOUT,
            lambda r: _scan_yes_no(r, "brain_mri")),
    Adapter("isic", "ISIC", "medical", True, ISIC_LAYOUT, _scan_isic),
    Adapter("colondb", "CVC-ColonDB", "medical", True, COLON_LAYOUT,
            lambda r: _scan_pairs(r, "colon", _IMG_DIRS, _MASK_DIRS, COLON_LAYOUT)),
    Adapter("clinicdb", "CVC-ClinicDB", "medical", True, COLON_LAYOUT,
            lambda r: _scan_pairs(r, "colon", _IMG_DIRS, _MASK_DIRS, COLON_LAYOUT)),
    Adapter("endo", "Endo", "medical", True, KVASIR_LAYOUT,
            lambda r: _scan_pairs(r, "colon", _IMG_DIRS, _MASK_DIRS, KVASIR_LAYOUT)),
    Adapter("kvasir", "Kvasir", "medical", True, KVASIR_LAYOUT,
            lambda r: _scan_pairs(r, "colon", _IMG_DIRS, _MASK_DIRS, KVASIR_LAYOUT)),
    Adapter("folder", "a folder of your own", "any", True, FOLDER_LAYOUT, _scan_folder),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_key(a.title): a.name for a in ADAPTERS.values()} | {
    "mvtecad": "mvtec", "dtdsynthetic": "dtd", "cvccolondb": "colondb",
    "cvcclinicdb": "clinicdb", "kvasirseg": "kvasir", "ksdd": "ksdd2"}


def adapter(name: str) -> Adapter:
    """The adapter for ``name`` (registry key or published name, any case/punctuation)."""
    k = _key(name)
    k = k if k in ADAPTERS else _ALIASES.get(k, k)
    if k not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[k]


def convert(name: str, root: str | os.PathLike, out: str | os.PathLike | None = None,
            check: bool = False, **options) -> Path:
    """Scan ``root`` in dataset ``name``'s layout and write ``meta.json``; return its path.

    ``out``: folder for meta.json when ``root`` is read-only (paths are then relative to
    ``out``, and ``out`` is the data root to load). Image-label-only datasets get
    ``"pixel_labels": false``. ``check``: decode every image and mask first and raise a
    ``ValueError`` listing each one that does not open or whose mask differs in size from its
    image (nothing is written then). ``options`` go to the scanner (KSDD2: ``balanced``,
    ``seed``).
    """
    a = adapter(name)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; expected {a.title} layout:\n{a.layout}")
    meta = a.scan(root, **options)
    base = Path(out) if out is not None else root
    n = 0
    for split in list(meta):
        for cls in list(meta[split]):
            rows = meta[split][cls]
            if not rows:
                del meta[split][cls]
                continue
            for r in rows:
                for k in ("img_path", "mask_path"):
                    if r[k]:
                        r[k] = Path(os.path.relpath(r[k], base)).as_posix()
            n += len(rows)
    meta.setdefault("train", {})
    meta.setdefault("test", {})
    _need(n > 0, f"no images found under {root}", a.layout)
    if not a.pixel_labels or not any(
            r["mask_path"] for s in ("train", "test") for rs in meta[s].values() for r in rs):
        meta["pixel_labels"] = False
        for s in ("train", "test"):
            for rs in meta[s].values():
                for r in rs:
                    r["mask_path"] = ""
    if check:
        problems = check_files(meta, base)
        if problems:
            lines = "\n".join(f"  {img}: {why}" for img, why in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(f"{len(problems)} of {n} samples under {root} cannot be used "
                             f"(no meta.json written):\n{lines}{more}\nreplace or remove these "
                             "files, or write meta.json without --check and load it with "
                             "skip_bad=True to skip them")
    return atomic_write_json(base / "meta.json", meta)


def check_files(meta: dict, base: str | os.PathLike) -> list[tuple[str, str]]:
    """``(img_path, reason)`` for each sample of ``meta`` (paths relative to ``base``) whose
    image or mask does not decode, or whose mask is not the size of its image."""
    # Imported here: pfl.data.dataset imports torch, which `pfl --help` should not wait for.
    from pfl.data.dataset import BadSampleError, check_sample_files

    problems = []
    for split in ("train", "test"):
        for rows in meta.get(split, {}).values():
            for r in rows:
                try:
                    check_sample_files(base, r["img_path"], r["mask_path"])
                except BadSampleError as e:
                    problems.append((r["img_path"], str(e)))
    return problems
