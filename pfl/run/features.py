"""Frozen image-tower features computed once per dataset split, cached, and served as batches.

Both CLIP towers are frozen (docs/reproduction.md, "Backbone"), so an image's ``ImageFeatures``
never change during training or evaluation: :func:`extract` encodes a dataset split once and keeps
the features with the masks, labels, class names and paths in a :class:`FeatureStore`.
Training then costs only the new modules, which is what makes CPU training and the notebooks
fast. A store can also be kept on disk (``runs/cache/<key>.safetensors``), keyed by a hash of
the backbone's image-tower weights, its tapped layers and input size, the dataset's root,
split and sample list, the storage dtype and the CPU kernels. A split's first N images per
category (``profile_store(..., per_class=N)``) are read from the whole split's store when that
is cached already (an image's features do not depend on its batch neighbours: tested bit for
bit), so notebooks that look at different subsets of one split encode it once.

Storage dtype: ``float16`` by default. The patch tokens of the tiny tower at 224 px take
256 KB per image in fp16 (512 KB in fp32); the 768-dimensional ViT-L tokens at 518 px take
11 MB, which is why the ``paper`` profile streams images instead (``cache="none"``). Batches
are served in float32. Rounding to fp16 changes a token by at most ~5e-4 of its magnitude;
tests/test_features.py checks that maps and metrics of a method on fp16 features match fp32.

    >>> import torch
    >>> from pfl.clip.backbone import ImageFeatures
    >>> store = FeatureStore(
    ...     ImageFeatures(torch.zeros(4, 8), torch.zeros(4, 2, 9, 16)),
    ...     masks=torch.zeros(4, 12, 12), labels=torch.tensor([0, 1, 0, 1]),
    ...     cls_names=["a", "a", "b", "b"], paths=["0", "1", "2", "3"])
    >>> store.classes, len(store.subset(classes=["b"]))
    (['a', 'b'], 2)
    >>> [len(b) for b in store.batches(3)]
    [3, 1]
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.clip.pretrain import PretrainConfig, make_batch
from pfl.config import repo_root
from pfl.data.dataset import AnomalyDataset
from pfl.data.synthetic import SynthConfig, ensure_benchmark
from pfl.method.contract import Batch
from pfl.utils import atomic_write, kernel_dispatch

CACHE_VERSION = 2  # bump when the stored layout changes: old cache files are then ignored
CACHE_MODES = ("memory", "disk", "none")

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MEMORY: dict[str, FeatureStore] = {}


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` if given, else on only when stderr is a terminal (off in notebooks/CI)."""
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def backbone_fingerprint(backbone: Backbone) -> str:
    """Hash of the image tower's weights, tapped layers and input size.

    Hashes every byte of the visual state dict (~1 s for ViT-L, milliseconds for the tiny
    tower), memoised per object together with the tensors' version counters, so an in-place
    change of a weight is seen.
    """
    state = backbone.clip.visual.state_dict()
    versions = tuple(t._version for t in state.values())
    memo = _FINGERPRINTS.get(backbone)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    h.update(json.dumps([list(backbone.layers), backbone.image_size]).encode())
    for name, t in sorted(state.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    fp = h.hexdigest()[:20]
    _FINGERPRINTS[backbone] = (versions, fp)
    return fp


def dataset_fingerprint(dataset) -> dict:
    """What identifies a dataset split without reading its images: root, split, samples.

    Uses ``dataset.fingerprint()`` when the dataset has one (AnomalyDataset),
    else its ``root``, ``split`` and ``samples``/``entries`` attributes; a dataset with none of
    these cannot be cached on disk (it is still cached in memory for the process).
    """
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    samples = getattr(dataset, "samples", None) or getattr(dataset, "entries", None)
    if samples is None:
        raise ValueError(
            f"{type(dataset).__name__} has no fingerprint(), samples or entries: it cannot be "
            "cached on disk; use cache='memory' or 'none'"
        )
    return {
        "root": str(Path(getattr(dataset, "root", "")).resolve()),
        "split": getattr(dataset, "split", None),
        "image_size": getattr(dataset, "image_size", None),
        "samples": [s if isinstance(s, Mapping | str | int) else repr(s) for s in samples],
    }


def cache_key(backbone: Backbone, dataset, storage_dtype: torch.dtype) -> str:
    """Hex key of (image-tower weights, layers, size, dataset split, storage dtype, and the CPU
    kernels that compute the features, :func:`pfl.utils.kernel_dispatch`)."""
    payload = {
        "version": CACHE_VERSION,
        "kernels": kernel_dispatch(),
        "backbone": backbone_fingerprint(backbone),
        "dataset": dataset_fingerprint(dataset),
        "dtype": str(storage_dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :24
    ]


def select_rows(cls_names: Sequence[str], labels: Sequence[int],
                classes: Sequence[str] | None = None, per_class: int | None = None,
                exclude: Sequence[str] = ()) -> list[int]:
    """Rows of the samples of ``classes`` (default all) minus ``exclude``, at most
    ``per_class`` normal and ``per_class`` anomalous ones per category, in order.

    >>> select_rows(["a", "a", "a", "b"], [0, 1, 0, 1], per_class=1, exclude=["b"])
    [0, 1]
    """
    present = sorted(set(cls_names))
    keep = set(present if classes is None else classes) - set(exclude)
    unknown = keep - set(present)
    if unknown:
        raise ValueError(f"categories {sorted(unknown)} are not in this store (it has {present})")
    counts: dict[tuple[str, int], int] = {}
    rows = []
    for i, (c, y) in enumerate(zip(cls_names, labels)):
        if c not in keep:
            continue
        k = counts.get((c, int(y)), 0)
        if per_class is None or k < per_class:
            rows.append(i)
            counts[(c, int(y))] = k + 1
    return rows


@dataclass
class FeatureStore:
    """The frozen tower's output for every sample of one dataset split, with its ground truth.

    Attributes:
        feats: ``global_ (N, E)``, ``patches (N, L, T, W)`` in the storage dtype, and the
            images' content keys ``image_keys (N,)`` (:func:`pfl.utils.content_keys`).
        masks: ``(N, S, S)`` uint8 in {0, 1} (zeros for normal images and image-label data).
        labels: ``(N,)`` int64, 0 normal / 1 anomalous.
        cls_names, paths: N category names and image paths.
        has_mask: False for datasets with image labels only (pixel metrics are skipped).
        dataset: the source dataset, to read pixels back for methods that need them.
        indices: position of each sample in ``dataset``.
    """

    feats: ImageFeatures
    masks: torch.Tensor
    labels: torch.Tensor
    cls_names: list[str]
    paths: list[str]
    has_mask: bool = True
    dataset: object | None = None
    indices: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.cls_names)
        shapes = {
            "global_": self.feats.global_.shape[0], "patches": self.feats.patches.shape[0],
            "masks": self.masks.shape[0], "labels": self.labels.shape[0], "paths": len(self.paths),
        }
        bad = {k: v for k, v in shapes.items() if v != n}
        if bad:
            raise ValueError(f"FeatureStore: {n} class names but {bad} rows")
        if not self.indices:
            self.indices = list(range(n))

    def __len__(self) -> int:
        return len(self.cls_names)

    @property
    def classes(self) -> list[str]:
        """The categories present, sorted."""
        return sorted(set(self.cls_names))

    @property
    def image_size(self) -> int:
        return int(self.masks.shape[-1])

    def select(self, rows: Sequence[int]) -> FeatureStore:
        """The samples at ``rows`` (a new store sharing nothing mutable with this one)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return FeatureStore(
            self.feats.select(idx),
            masks=self.masks[idx], labels=self.labels[idx],
            cls_names=[self.cls_names[i] for i in rows], paths=[self.paths[i] for i in rows],
            has_mask=self.has_mask, dataset=self.dataset,
            indices=[self.indices[i] for i in rows],
        )

    def rehome(self, dataset, indices: Sequence[int]) -> FeatureStore:
        """The same features and labels, read back (pixels, for methods that need them) from
        ``dataset`` at ``indices``."""
        return FeatureStore(self.feats, self.masks, self.labels, list(self.cls_names),
                            list(self.paths), self.has_mask, dataset, list(indices))

    def subset(self, classes: Sequence[str] | None = None, per_class: int | None = None,
               exclude: Sequence[str] = ()) -> FeatureStore:
        """Samples of ``classes`` (default all) minus ``exclude``; at most ``per_class`` normal
        and ``per_class`` anomalous images per category (the first ones, in store order)."""
        return self.select(select_rows(self.cls_names, self.labels.tolist(), classes,
                                       per_class, exclude))

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, with_images: bool = False,
                dtype: torch.dtype | None = None) -> Iterator[Batch]:
        """:class:`pfl.method.contract.Batch` es of ``batch_size`` (the last may be smaller).

        Args:
            shuffle: a random order from ``generator`` (``torch.randperm``), else store order.
            with_images: also read the CLIP-normalised images back from the dataset (for
                methods that look at pixels).
            dtype: features and masks are served in this dtype (None: torch's default dtype).
        """
        dtype = dtype or torch.get_default_dtype()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            rows = idx.tolist()
            images = None
            if with_images:
                if self.dataset is None:
                    raise ValueError("this FeatureStore has no dataset to read images from; "
                                     "build it with pfl.run.features.extract(backbone, dataset)")
                images = torch.stack([self.dataset[self.indices[i]]["image"] for i in rows])
            yield Batch(
                cls_names=[self.cls_names[i] for i in rows],
                images=images,
                feats=self.feats.select(idx).to(dtype=dtype),
                masks=self.masks[idx].to(dtype),
                labels=self.labels[idx].clone(),
                paths=[self.paths[i] for i in rows],
            )

    # --- disk --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the store as one safetensors file (atomically); the dataset is not saved."""
        tensors = {
            "global_": self.feats.global_.contiguous(),
            "patches": self.feats.patches.contiguous(),
            **({} if self.feats.image_keys is None
               else {"image_keys": self.feats.image_keys.contiguous()}),
            "masks": self.masks.to(torch.uint8).contiguous(),
            "labels": self.labels.to(torch.int64).contiguous(),
        }
        meta = {"cls_names": json.dumps(self.cls_names), "paths": json.dumps(self.paths),
                "has_mask": json.dumps(self.has_mask), "indices": json.dumps(self.indices),
                "version": str(CACHE_VERSION)}
        return atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, dataset=None) -> FeatureStore:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        return cls(
            ImageFeatures(t["global_"], t["patches"], t.get("image_keys")), masks=t["masks"],
            labels=t["labels"],
            cls_names=json.loads(meta["cls_names"]), paths=json.loads(meta["paths"]),
            has_mask=json.loads(meta["has_mask"]), dataset=dataset,
            indices=json.loads(meta["indices"]),
        )


def _stack_samples(samples: list[dict], size: int) -> dict:
    for s in samples:
        shape = tuple(s["image"].shape)
        if shape != (3, size, size):
            raise ValueError(
                f"image {s['path']!r} is {shape} but the backbone takes (3, {size}, {size}): "
                f"build the dataset with image_size={size}"
            )
        if torch.as_tensor(s["mask"]).numel() != size * size:
            raise ValueError(f"mask of {s['path']!r} is {tuple(s['mask'].shape)}, not "
                             f"({size}, {size}): masks must match the image size")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([torch.as_tensor(s["mask"]).reshape(size, size) for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples]),
        "cls_name": [s["cls_name"] for s in samples],
        "path": [str(s["path"]) for s in samples],
        "has_mask": [bool(s.get("has_mask", True)) for s in samples],
    }


def encode_dataset(backbone: Backbone, dataset, *, batch_size: int = 32,
                   storage_dtype: torch.dtype = torch.float16, progress: bool | None = None,
                   desc: str = "features") -> FeatureStore:
    """Encode every sample of ``dataset`` with the frozen tower.

    ``dataset[i]`` must be a dict with ``image (3, S, S)`` (CLIP-normalised, S the backbone's
    input size), ``mask (S, S)``, ``label``, ``cls_name``, ``path`` and optionally
    ``has_mask`` (:class:`pfl.data.dataset.AnomalyDataset` gives these).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {getattr(dataset, 'root', dataset)!r} has no samples")
    globals_, patches, keys, masks, labels, names, paths, has_mask = ([] for _ in range(8))
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress_enabled(progress))
    for start in range(0, n, batch_size):
        b = _stack_samples([dataset[i] for i in range(start, min(n, start + batch_size))],
                           backbone.image_size)
        f = backbone.encode_image(b["image"])
        globals_.append(f.global_.to(storage_dtype))
        patches.append(f.patches.to(storage_dtype))
        keys.append(f.image_keys)
        masks.append((b["mask"] > 0.5).to(torch.uint8))
        labels.append(b["label"])
        names += b["cls_name"]
        paths += b["path"]
        has_mask += b["has_mask"]
        bar.update(len(b["path"]))
    bar.close()
    return FeatureStore(
        ImageFeatures(torch.cat(globals_), torch.cat(patches), torch.cat(keys)),
        masks=torch.cat(masks),
        labels=torch.cat(labels), cls_names=names, paths=paths, has_mask=all(has_mask),
        dataset=dataset,
    )


def default_cache_dir() -> Path:

    return repo_root() / "runs" / "cache"


def extract(backbone: Backbone, dataset, *, cache: str = "disk",
            cache_dir: str | Path | None = None, batch_size: int = 32,
            storage_dtype: torch.dtype = torch.float16, progress: bool | None = None,
            desc: str = "features") -> FeatureStore:
    """The :class:`FeatureStore` of ``dataset``: from memory, from disk, or encoded now.

    Args:
        cache: ``"memory"`` (keep for this process), ``"disk"`` (also
            ``cache_dir/<key>.safetensors``, default ``runs/cache``) or ``"none"``.
        storage_dtype: dtype the features are kept in (float16 default, see module docstring).
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "none":
        return encode_dataset(backbone, dataset, batch_size=batch_size,
                              storage_dtype=storage_dtype, progress=progress, desc=desc)
    try:
        key = cache_key(backbone, dataset, storage_dtype)
    except ValueError:
        if cache == "disk":
            raise
        key = None
    if key is not None:  # (no key: nothing can be cached, in memory or on disk)
        store = cached_store(backbone, dataset, cache=cache, cache_dir=cache_dir,
                             storage_dtype=storage_dtype, key=key)
        if store is not None:
            return store
    store = encode_dataset(backbone, dataset, batch_size=batch_size,
                           storage_dtype=storage_dtype, progress=progress, desc=desc)
    if cache == "disk":
        store.save(Path(cache_dir or default_cache_dir()) / f"{key}.safetensors")
    if key is not None:
        _MEMORY[key] = store
    return store


def cached_store(backbone: Backbone, dataset, *, cache: str = "disk",
                 cache_dir: str | Path | None = None,
                 storage_dtype: torch.dtype = torch.float16,
                 key: str | None = None) -> FeatureStore | None:
    """The store :func:`extract` would serve for ``dataset`` if it is already in memory or
    (``cache="disk"``) on disk, else None: nothing is encoded."""
    if key is None:
        try:
            key = cache_key(backbone, dataset, storage_dtype)
        except ValueError:
            return None
    if key in _MEMORY:
        hit = _MEMORY[key]
        return hit.rehome(dataset, list(hit.indices))
    path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
    if cache == "disk" and path.is_file():
        store = FeatureStore.load(path, dataset)
        _MEMORY[key] = store
        return store
    return None


def clear_memory_cache() -> None:
    """Forget every store kept in memory by :func:`extract`."""
    _MEMORY.clear()


class StreamingStore:
    """The :class:`FeatureStore` interface without a cache: each batch's images are read and
    encoded when it is served (for towers whose features do not fit in memory or on disk,
    e.g. ViT-L at 518 px). Class names and labels come from ``dataset.samples``."""

    def __init__(self, backbone: Backbone, dataset, rows: Sequence[int] | None = None):
        self.backbone, self.dataset = backbone, dataset
        self.indices = list(range(len(dataset))) if rows is None else list(rows)
        samples = dataset.samples
        self.cls_names = [samples[i]["cls_name"] for i in self.indices]
        self.labels = torch.tensor([int(samples[i]["anomaly"]) for i in self.indices])
        self.paths = [str(Path(dataset.root) / samples[i]["img_path"]) for i in self.indices]
        self.has_mask = bool(getattr(dataset, "pixel_labels", True))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.cls_names))

    @property
    def image_size(self) -> int:
        return int(self.backbone.image_size)

    def subset(self, classes: Sequence[str] | None = None, per_class: int | None = None,
               exclude: Sequence[str] = ()) -> StreamingStore:
        rows = select_rows(self.cls_names, self.labels.tolist(), classes, per_class, exclude)
        return StreamingStore(self.backbone, self.dataset, [self.indices[r] for r in rows])

    def select(self, rows: Sequence[int]) -> StreamingStore:
        """The samples at ``rows`` (as :meth:`FeatureStore.select`)."""
        return StreamingStore(self.backbone, self.dataset, [self.indices[r] for r in rows])

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, with_images: bool = False,
                dtype: torch.dtype | None = None) -> Iterator[Batch]:
        dtype = dtype or torch.get_default_dtype()
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size].tolist()
            b = _stack_samples([self.dataset[self.indices[i]] for i in rows],
                               self.backbone.image_size)
            f = self.backbone.encode_image(b["image"])
            yield Batch(cls_names=b["cls_name"], images=b["image"] if with_images else None,
                        feats=f.to(dtype=dtype),
                        masks=(b["mask"] > 0.5).to(dtype), labels=b["label"], paths=b["path"])


# --------------------------------------------------------------------------- profiles

AUTO_CACHE_LIMIT = 2 * 2**30  # "auto": cache on disk below 2 GiB of features, else stream


def data_root(root: str | Path) -> Path:
    """A data root: absolute as given; relative to the checkout (where ``data/`` lives) when
    running from one, else to the current folder."""

    root = Path(root).expanduser()
    if root.is_absolute():
        return root
    base = repo_root() if (repo_root() / "pyproject.toml").is_file() else Path.cwd()
    return base / root


def profile_dataset(profile, name: str, split: str = "test", classes=None,
                    image_size: int | None = None):
    """The ``AnomalyDataset`` of dataset ``name`` (a folder under the profile's
    data root), building the synthetic benchmark first when the profile says so (at the
    profile's size); read at ``image_size`` (default: the profile's backbone size)."""

    root = data_root(profile.data.root)
    if profile.data.synthetic:

        n = profile.data.synth_images
        ensure_benchmark(root, SynthConfig(image_size=profile.backbone.image_size,
                                           n_train_normal=n, n_train_anomalous=n,
                                           n_test_normal=n, n_test_anomalous=n))
    return AnomalyDataset(root / name, split, classes=classes,
                          image_size=image_size or profile.backbone.image_size)


def resolve_cache(mode: str, backbone: Backbone, n_images: int) -> str:
    """``"auto"`` -> ``"disk"`` when the fp16 features of ``n_images`` fit
    :data:`AUTO_CACHE_LIMIT` (the tiny tower), else ``"none"`` (ViT-L at 518 px: 11 MB each)."""
    if mode != "auto":
        return mode
    gh, gw = backbone.grid
    size = n_images * len(backbone.layers) * gh * gw * backbone.vision_width * 2
    return "disk" if size <= AUTO_CACHE_LIMIT else "none"


def subsample_dataset(dataset, per_class: int | None):
    """A shallow copy of an :class:`pfl.data.dataset.AnomalyDataset` keeping the first ``per_class``
    normal and ``per_class`` anomalous samples of each category (its cache key changes too);
    None keeps all.

    The synthetic benchmark assigns defect kinds in turn, so the first anomalous samples
    cover the kinds evenly.
    """
    import copy

    if per_class is None:
        return dataset
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
    rows = select_rows([s["cls_name"] for s in dataset.samples],
                       [int(s["anomaly"]) for s in dataset.samples], per_class=per_class)
    out = copy.copy(dataset)
    out.samples = [dataset.samples[i] for i in rows]
    return out


def profile_store(profile, backbone: Backbone, name: str, split: str = "test", *,
                  classes=None, per_class: int | None = None, cache: str | None = None,
                  progress: bool | None = None) -> FeatureStore | StreamingStore:
    """Features of one split of dataset ``name`` under the profile's data root.

    The images are read at the backbone's input size, which may differ from the profile's
    (e.g. 112 px sweeps on 224 px data). ``per_class``: only the first that many normal and
    anomalous images of each category (:func:`subsample_dataset`). ``cache``: as
    ``DataConfig.feature_cache`` (default: the profile's; "auto" | "disk" | "memory" |
    "none", which serves a :class:`StreamingStore`).
    """
    whole = profile_dataset(profile, name, split, classes, image_size=backbone.image_size)
    ds = subsample_dataset(whole, per_class)
    cache = resolve_cache(cache or profile.data.feature_cache, backbone, len(ds))
    if cache == "none":
        return StreamingStore(backbone, ds)
    if ds is not whole:  # the whole split already encoded (another notebook): take the rows
        full = cached_store(backbone, whole, cache=cache)
        if full is not None:
            rows = select_rows(full.cls_names, full.labels.tolist(), per_class=per_class)
            return full.select(rows).rehome(ds, range(len(rows)))
    return extract(backbone, ds, cache=cache, progress=progress, desc=f"{name}/{split}")


def pattern_store(backbone: Backbone, pairs: int = 160, seed: int = 999, batch: int = 32,
                  defect_area: tuple[float, float] = (0.002, 0.05)) -> FeatureStore:
    """Fresh pairs of the tiny CLIP's pretraining domain, encoded by the frozen ``backbone``.

    Flawless and defective pattern images drawn as in pretraining
    (:func:`pfl.clip.pretrain.draw_batch`) but from the data stream of ``seed`` (the shipped run
    used seed 0), at the backbone's image size, with defects of the evaluation's size by
    default. Returns a :class:`FeatureStore` with one category, ``"patterns"`` (flawless and
    defective alternate), so that what the tower learned in its own domain can be compared
    with what transfers to photographs, e.g. with :func:`pfl.run.evaluate.linear_probe_auroc`.
    """

    cfg = PretrainConfig(batch=batch, image_size=backbone.image_size, final_size=None,
                         seed=seed, defect_area=defect_area, zoom=0.0)
    feats, masks, labels = [], [], []
    with torch.no_grad():
        for step in range(math.ceil(pairs / batch)):
            b = make_batch(cfg, step, patch=backbone.image_size // backbone.grid[0])
            f = backbone.encode_image(b.images)
            feats.append(ImageFeatures(f.global_, f.patches.half(), f.image_keys))
            masks.append(b.masks.to(torch.uint8))
            labels += [int(k != "") for k in b.kinds]
    n = 2 * pairs
    return FeatureStore(
        ImageFeatures(torch.cat([f.global_ for f in feats])[:n],
                      torch.cat([f.patches for f in feats])[:n],
                      torch.cat([f.image_keys for f in feats])[:n]),
        masks=torch.cat(masks)[:n], labels=torch.tensor(labels[:n]),
        cls_names=["patterns"] * n, paths=[f"patterns/{seed}/{i:04d}" for i in range(n)])
