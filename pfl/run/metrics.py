"""Image and pixel anomaly-detection metrics per category, and AUPRO.

docs/reproduction.md, "Metrics".

The paper reports, per category and then as the mean over categories (appendix Tables A.4-A.9):
image-level AUROC, AP and F1-max; pixel-level AUROC, AP, F1-max and PRO (the area under the
per-region-overlap curve up to a false-positive rate of 0.3, "AUPRO").

Image metrics come straight from scikit-learn. Pixel metrics are computed from one exact
threshold sweep (:func:`pixel_sweep`), because scikit-learn on a category at 518 px (~170 maps
x 268k pixels = 46 M values, 463 M for all of MVTec-AD) would hold several float64 and int64
copies of every pixel.

Note (exactness and memory of the sweep):
    Every distinct score of an anomalous pixel is a threshold; the normal pixels are counted
    against those thresholds chunk by chunk (each chunk sorted, then ``searchsorted``), so all
    counts are exact integers and the ROC, PR and PRO curves have a vertex at every distinct
    score, ties included, just as scikit-learn's curves do. Only the final divisions and
    trapezoid sums are floating point (float64, on arrays as long as the number of distinct
    anomalous scores). Maps stay in their own dtype (float32 at 518 px) and are never copied
    to float64; the working memory is about two chunks of normal-pixel scores
    (``chunk_pixels``, 16 M by default) plus O(number of anomalous pixels): measured 4 s and
    170 MB above the inputs for 170 synthetic maps of 518 x 518 on 2 CPU cores. Pixel AUROC,
    AP and F1-max equal scikit-learn's to ~1e-12 (tests/test_metrics.py checks 1e-9). The
    benchmark ``python benchmarks/metrics.py`` times exact AUPRO against the relabelling loop.

AUPRO, two variants by name (``EvalConfig.aupro``):
    ``"exact"`` (default): ground-truth regions are the 8-connected components of each mask,
    labelled once. PRO(t) is the mean over all regions of the category of the fraction of the
    region with score >= t, FPR(t) the fraction of normal pixels with score >= t. The curve
    (FPR, PRO) is integrated exactly (trapezoids between the vertices) from 0 to FPR 0.3, the
    end point interpolated on its segment, and divided by 0.3, so a perfect map scores 1.
    ``"common"``: the algorithm most public code uses: 200 equally spaced thresholds from the
    minimum to the maximum score, a pixel is positive when its score is strictly above the
    threshold; keep the points with FPR < 0.3, min-max rescale those FPRs to [0, 1], and take
    the trapezoid area. It depends on the score range and on the threshold grid; use it only to
    compare with published numbers. :func:`aupro_common_reference` is the straightforward
    loop (relabelling every mask at every threshold) it is checked against.

    >>> import numpy as np
    >>> masks = np.zeros((2, 8, 8), np.uint8); masks[0, 2:5, 2:5] = 1
    >>> maps = masks.astype(np.float32)  # a perfect map
    >>> m = pixel_metrics(maps, masks)
    >>> round(m["pixel_auroc"], 4), round(m["pixel_pro"], 4)
    (1.0, 1.0)
    >>> round(aupro(1.0 - maps, masks), 4)  # inverted map
    0.0
    >>> image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])["image_auroc"]
    0.75
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_pro")
METRICS = IMAGE_METRICS + PIXEL_METRICS
AUPRO_VARIANTS = ("exact", "common")
FPR_LIMIT = 0.3  # PRO is integrated up to this false-positive rate
COMMON_THRESHOLDS = 200  # threshold count of the common AUPRO code


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on this data (e.g. one class missing) and was set to NaN."""


def _warn(reasons: Sequence[str]) -> None:
    if reasons:
        warnings.warn(
            "metrics undefined, set to NaN: " + "; ".join(reasons),
            UndefinedMetricWarning,
            stacklevel=3,
        )


def _names(n: int, paths: Sequence[str] | None) -> list[str]:
    """How errors name the samples: ``sample i (path)``."""
    if paths is not None and len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} samples")
    return [f"sample {i}" + (f" ({paths[i]})" if paths is not None else "") for i in range(n)]


# ----------------------------------------------------------------------------- image level


def f1_max(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Best F1 = 2PR/(P+R) over all thresholds of scikit-learn's precision-recall curve.

    Points with P = R = 0 count as F1 = 0. Needs at least one positive.
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _image_metrics(scores, labels, names, reasons: list[str], where: str) -> dict[str, float]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"image scores {scores.shape} and labels {labels.shape} must be equal 1-D shapes"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"image score of {names[bad[0]]} is {scores[bad[0]]}: scores must be "
            "finite; check the model output"
        )
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(f"label of {names[bad[0]]} is {labels[bad[0]]}; use 0 or 1")
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        # AUROC needs both classes; AP and F1-max need anomalies and would be a trivial 1.0
        # with anomalies only, which says nothing about the detector.
        kind = "normal" if n_pos == 0 else "anomalous"
        reasons.append(f"{where}only {kind} images (image metrics need both)")
        return dict.fromkeys(IMAGE_METRICS, math.nan)
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1max": f1_max(labels, scores),
    }


def image_metrics(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    paths: Sequence[str] | None = None,
) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of one category (scikit-learn).

    Args:
        scores: (N,) image anomaly scores, finite.
        labels: (N,) 0 normal, 1 anomalous.
        paths: optional (N,) image paths, named in errors.
    Returns:
        ``{"image_auroc", "image_ap", "image_f1max"}``; all NaN, with one
        :class:`UndefinedMetricWarning`, when the category lacks normal or anomalous images.
    """
    reasons: list[str] = []
    out = _image_metrics(scores, labels, _names(len(scores), paths), reasons, "")
    _warn(reasons)
    return out


# ----------------------------------------------------------------------------- pixel level


def _get_map(maps, i: int, names) -> np.ndarray:
    s = np.asarray(maps[i])
    if s.ndim != 2:
        raise ValueError(f"anomaly map of {names[i]} has shape {s.shape}; want (H, W)")
    if s.dtype.kind not in "fiu":
        raise ValueError(f"anomaly map of {names[i]} has dtype {s.dtype}; want float")
    return s


def _get_mask(masks, i: int, shape: tuple[int, ...], names) -> np.ndarray:
    m = np.asarray(masks[i])
    if m.shape != shape:
        raise ValueError(
            f"mask of {names[i]} has shape {m.shape} but its anomaly map {shape}; "
            "resize the mask (nearest or bilinear + 0.5 threshold) to the map size"
        )
    if m.dtype != bool:
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(
                f"mask of {names[i]} holds values other than 0 and 1; binarise it (e.g. mask > 0.5)"
            )
        m = m != 0
    return m


def common_thresholds(lo, hi, n: int = COMMON_THRESHOLDS, dtype=np.float32) -> np.ndarray:
    """The common AUPRO code's grid: ``lo + i (hi - lo) / n`` for i = 0..n-1, in ``dtype``.

    The common code writes ``np.arange(lo, hi, (hi - lo) / n)``, whose length is n or n + 1
    depending on rounding; this grid always has n points.

    >>> common_thresholds(0.0, 1.0, 4).tolist()
    [0.0, 0.25, 0.5, 0.75]
    """
    lo, hi = float(lo), float(hi)
    return (lo + (hi - lo) * (np.arange(n, dtype=np.float64) / n)).astype(dtype)


@dataclass
class PixelSweep:
    """Exact sufficient statistics of one category's pixel scores (see the module Note).

    ``values`` are the K distinct scores of anomalous pixels, ascending; for each:
    ``pos_count`` anomalous pixels with that score, ``region_weight`` the sum over them of
    1 / (n_regions * |region|) (PRO's weight; sums to 1), ``neg_lt`` / ``neg_le`` the normal
    pixels with a score below / not above it. ``common_*`` hold the common AUPRO grid and the
    normal pixels not above each of its thresholds.
    """

    values: np.ndarray  # (K,) map dtype
    pos_count: np.ndarray  # (K,) int64
    region_weight: np.ndarray  # (K,) float64
    neg_lt: np.ndarray  # (K,) int64
    neg_le: np.ndarray  # (K,) int64
    n_pos: int
    n_neg: int
    n_regions: int
    common_thresholds: np.ndarray  # (COMMON_THRESHOLDS,) map dtype; empty if all scores equal
    common_neg_le: np.ndarray  # (COMMON_THRESHOLDS,) int64

    def undefined(self) -> str | None:
        """Why the pixel metrics are undefined (one class missing), else None."""
        if self.n_pos == 0:
            return "no anomalous pixels (pixel metrics need both)"
        if self.n_neg == 0:
            return "no normal pixels (pixel metrics need both)"
        return None

    def _descending(self):
        tp_ge = np.cumsum(self.pos_count[::-1])  # anomalous pixels with score >= value
        fp_ge = self.n_neg - self.neg_lt[::-1]  # normal pixels with score >= value
        fp_gt = self.n_neg - self.neg_le[::-1]  # normal pixels with score > value
        return tp_ge, fp_ge, fp_gt

    def _curve(self, y_ge: np.ndarray, y_gt: np.ndarray, y_end: float):
        """Vertices of the curve (FPR, y) as the threshold falls from +inf to -inf.

        Between two anomalous values only normal pixels enter (a horizontal run to
        ``fp_gt``); at a value, its anomalous and normal pixels enter together (a diagonal
        for ties), as in scikit-learn's ROC.
        """
        _, fp_ge, fp_gt = self._descending()
        x = np.empty(2 * len(fp_ge) + 2, np.float64)
        y = np.empty_like(x)
        x[0], y[0], x[-1], y[-1] = 0.0, 0.0, 1.0, y_end
        x[1:-1:2], x[2:-1:2] = fp_gt / self.n_neg, fp_ge / self.n_neg
        y[1:-1:2], y[2:-1:2] = y_gt, y_ge
        return x, y

    def auroc(self) -> float:
        """Pixel AUROC (trapezoid area of the exact ROC curve); NaN if undefined."""
        if self.undefined():
            return math.nan
        tp_ge, _, _ = self._descending()
        tpr_ge = tp_ge / self.n_pos
        tpr_gt = (tp_ge - self.pos_count[::-1]) / self.n_pos
        return partial_area(*self._curve(tpr_ge, tpr_gt, 1.0), 1.0)

    def ap(self) -> float:
        """Pixel average precision, sum over recall steps of (delta recall) x precision."""
        if self.undefined():
            return math.nan
        tp_ge, fp_ge, _ = self._descending()
        precision = tp_ge / (tp_ge + fp_ge)
        return float(np.sum(self.pos_count[::-1] * precision) / self.n_pos)

    def f1_max(self) -> float:
        """Best pixel F1 = 2 TP / (P + TP + FP); its maximum lies at an anomalous score."""
        if self.undefined():
            return math.nan
        tp_ge, fp_ge, _ = self._descending()
        return float(np.max(2 * tp_ge / (self.n_pos + tp_ge + fp_ge)))

    def aupro(self, variant: str = "exact", fpr_limit: float = FPR_LIMIT) -> float:
        """AUPRO up to ``fpr_limit``: ``"exact"`` or ``"common"`` (module docstring)."""
        if variant not in AUPRO_VARIANTS:
            raise ValueError(f"unknown AUPRO variant {variant!r}; use one of {AUPRO_VARIANTS}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if self.undefined():
            return math.nan
        if variant == "exact":
            pro_ge = np.cumsum(self.region_weight[::-1])
            pro_gt = pro_ge - self.region_weight[::-1]
            x, y = self._curve(pro_ge, pro_gt, float(pro_ge[-1]))
            return partial_area(x, y, fpr_limit) / fpr_limit
        return self._aupro_common(fpr_limit)

    def _aupro_common(self, fpr_limit: float) -> float:
        th = self.common_thresholds
        if th.size == 0:
            return math.nan
        # PRO(th) = region weight of anomalous pixels strictly above th
        above = np.concatenate([np.cumsum(self.region_weight[::-1])[::-1], [0.0]])
        pro = above[np.searchsorted(self.values, th, side="right")]
        fpr = (self.n_neg - self.common_neg_le) / self.n_neg
        keep = fpr < fpr_limit
        fpr, pro = fpr[keep], pro[keep]
        if fpr.size < 2 or fpr.max() == fpr.min():
            return math.nan
        fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
        return float(auc(fpr, pro))


def partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y) from x[0] to ``limit``, end point interpolated.

    Args:
        x: (M,) non-decreasing, x[0] <= limit.
        y: (M,) curve values.

    >>> round(partial_area(np.array([0.0, 0.2, 1.0]), np.array([0.0, 1.0, 1.0]), 0.3), 12)
    0.2
    """
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit < x[k]
    xs, ys = x[:k], y[:k]
    if k < len(x) and xs[-1] < limit:
        t = (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs = np.append(xs, limit)
        ys = np.append(ys, y[k - 1] + t * (y[k] - y[k - 1]))
    return float(np.trapezoid(ys, xs))


def pixel_sweep(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    paths: Sequence[str] | None = None,
    connectivity: int = 2,
    chunk_pixels: int = 1 << 24,
    names: Sequence[str] | None = None,
) -> PixelSweep:
    """One exact sweep over a category's maps (module Note); all pixel metrics derive from it.

    Args:
        maps: (N, H, W) array or N arrays (H_i, W_i) of anomaly scores, float32 recommended;
            not copied to float64.
        masks: the same shapes, ground truth in {0, 1} (or bool).
        paths: optional N image paths, named in errors.
        connectivity: 2 = 8-connected regions (MVTec-AD's evaluation), 1 = 4-connected.
        chunk_pixels: normal-pixel scores sorted per chunk; bounds the working memory.
        names: how errors name the samples (overrides ``paths``).
    Raises:
        ValueError naming the sample for NaN/inf scores, shape mismatches, non-binary masks.
    """
    names = _names(len(maps), paths) if names is None else names
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} anomaly maps but {len(masks)} masks")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity}")
    structure = ndimage.generate_binary_structure(2, connectivity)
    pos_vals, pos_w = [], []
    n_regions = n_neg = 0
    lo, hi, dtype = math.inf, -math.inf, None
    for i in range(len(maps)):
        s = _get_map(maps, i, names)
        if not np.isfinite(s).all():
            raise ValueError(
                f"anomaly map of {names[i]} contains NaN or inf; check the model "
                "output (e.g. a normalisation dividing by zero)"
            )
        m = _get_mask(masks, i, s.shape, names)
        if s.size:
            lo, hi = min(lo, s.min()), max(hi, s.max())
        dtype = s.dtype if dtype is None else np.result_type(dtype, s.dtype)
        n_pos_i = int(np.count_nonzero(m))
        n_neg += m.size - n_pos_i
        if n_pos_i:
            labels, n_lab = ndimage.label(m, structure)
            ids = labels[m]
            sizes = np.bincount(ids)
            pos_vals.append(s[m])
            pos_w.append(1.0 / sizes[ids])
            n_regions += n_lab
    if dtype is None or dtype.kind != "f":
        dtype = np.dtype(np.float64)
    if pos_vals:
        values, inverse, pos_count = np.unique(
            np.concatenate(pos_vals).astype(dtype, copy=False),
            return_inverse=True,
            return_counts=True,
        )
        region_weight = np.bincount(inverse, weights=np.concatenate(pos_w) / n_regions)
        del inverse
    else:
        values, pos_count, region_weight = np.zeros(0, dtype), np.zeros(0, np.int64), np.zeros(0)
    pos_vals = pos_w = None
    th = common_thresholds(lo, hi, dtype=dtype) if hi > lo else np.zeros(0, dtype)

    neg_lt = np.zeros(len(values), np.int64)
    neg_le = np.zeros(len(values), np.int64)
    common_neg_le = np.zeros(len(th), np.int64)
    buffer: list[np.ndarray] = []
    for i in range(len(maps)):
        s = _get_map(maps, i, names)
        buffer.append(s[~_get_mask(masks, i, s.shape, names)])
        if sum(b.size for b in buffer) >= chunk_pixels or i == len(maps) - 1:
            # sorted chunk: every count is two binary searches per distinct anomalous value
            chunk = np.concatenate(buffer).astype(dtype, copy=False)
            chunk.sort()
            buffer.clear()
            neg_lt += np.searchsorted(chunk, values, side="left")
            neg_le += np.searchsorted(chunk, values, side="right")
            common_neg_le += np.searchsorted(chunk, th, side="right")
            del chunk
    return PixelSweep(
        values=values,
        pos_count=pos_count.astype(np.int64),
        region_weight=region_weight,
        neg_lt=neg_lt,
        neg_le=neg_le,
        n_pos=int(pos_count.sum()),
        n_neg=n_neg,
        n_regions=n_regions,
        common_thresholds=th,
        common_neg_le=common_neg_le,
    )


def _pixel_metrics(sweep: PixelSweep, aupro_variant, fpr_limit, reasons, where) -> dict:
    reason = sweep.undefined()
    if reason:
        reasons.append(where + reason)
        return dict.fromkeys(PIXEL_METRICS, math.nan)
    out = {
        "pixel_auroc": sweep.auroc(),
        "pixel_ap": sweep.ap(),
        "pixel_f1max": sweep.f1_max(),
        "pixel_pro": sweep.aupro(aupro_variant, fpr_limit),
    }
    if math.isnan(out["pixel_pro"]):
        reasons.append(where + "common AUPRO has fewer than two thresholds with FPR < limit")
    return out


def pixel_metrics(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    aupro: str = "exact",
    fpr_limit: float = FPR_LIMIT,
    paths: Sequence[str] | None = None,
    connectivity: int = 2,
) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and PRO of one category (shapes as :func:`pixel_sweep`).

    Returns ``{"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_pro"}``; all NaN, with one
    :class:`UndefinedMetricWarning`, when the category has no anomalous (or no normal) pixels.
    """
    sweep = pixel_sweep(maps, masks, paths=paths, connectivity=connectivity)
    reasons: list[str] = []
    out = _pixel_metrics(sweep, aupro, fpr_limit, reasons, "")
    _warn(reasons)
    return out


def aupro(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    variant: str = "exact",
    fpr_limit: float = FPR_LIMIT,
    paths: Sequence[str] | None = None,
    connectivity: int = 2,
) -> float:
    """AUPRO up to ``fpr_limit`` (module docstring); NaN with a warning when undefined."""
    sweep = pixel_sweep(maps, masks, paths=paths, connectivity=connectivity)
    reasons: list[str] = []
    out = _pixel_metrics(sweep, variant, fpr_limit, reasons, "")["pixel_pro"]
    _warn(reasons)
    return out


def aupro_common_reference(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    n_thresholds: int = COMMON_THRESHOLDS,
    fpr_limit: float = FPR_LIMIT,
    connectivity: int = 2,
) -> float:
    """The common AUPRO algorithm written plainly: the slow reference for tests and benchmarks.

    At each of ``n_thresholds`` thresholds, binarise every map (score > threshold), label
    every mask's regions again, average the per-region overlap and count the false
    positives; then keep FPR < ``fpr_limit``, min-max rescale the FPRs and take the trapezoid.
    Cost: n_thresholds x (labelling + a pass over all pixels).
    """
    structure = ndimage.generate_binary_structure(2, connectivity)
    maps = [np.asarray(s) for s in maps]
    masks = [np.asarray(m) != 0 for m in masks]
    lo = min(s.min() for s in maps)
    hi = max(s.max() for s in maps)
    dtype = np.result_type(*[s.dtype for s in maps])
    n_normal = sum(int(np.count_nonzero(~m)) for m in masks)
    fprs, pros = [], []
    for t in common_thresholds(lo, hi, n_thresholds, dtype):
        overlaps, false_pos = [], 0
        for s, m in zip(maps, masks):
            binary = s > t
            labels, n_lab = ndimage.label(m, structure)
            if n_lab:
                hits = np.bincount(labels.ravel(), weights=binary.ravel(), minlength=n_lab + 1)
                sizes = np.bincount(labels.ravel(), minlength=n_lab + 1)
                overlaps.extend(hits[1:] / sizes[1:])
            false_pos += int(np.count_nonzero(binary & ~m))
        pros.append(np.mean(overlaps))
        fprs.append(false_pos / n_normal)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros))


# ----------------------------------------------------------------------------- per category


@dataclass
class SampleRecord:
    """One test image's outputs and ground truth, as :func:`evaluate_records` takes them."""

    cls_name: str  # category
    score: float  # image-level anomaly score
    label: int  # 0 normal, 1 anomalous
    anomaly_map: np.ndarray | None = None  # (H, W) pixel scores, float32
    mask: np.ndarray | None = None  # (H, W) in {0, 1}; None on a normal image: all zeros
    path: str | None = None  # image path, named in errors

    @classmethod
    def coerce(cls, r: SampleRecord | Mapping) -> SampleRecord:
        return r if isinstance(r, cls) else cls(**r)


def evaluate_records(
    records: Iterable[SampleRecord | Mapping],
    *,
    has_masks: bool = True,
    aupro: str = "exact",
    fpr_limit: float = FPR_LIMIT,
    connectivity: int = 2,
) -> pd.DataFrame:
    """Per-category metrics and their mean over categories, as the paper reports them.

    Args:
        records: one :class:`SampleRecord` (or a mapping with its fields) per test image.
        has_masks: False for datasets with image labels only (HeadCT, BrainMRI, Br35H): pixel
            metrics are NaN without a warning.
        aupro: ``"exact"`` or ``"common"`` (module docstring).
    Returns:
        DataFrame, rows = categories (sorted) then ``"mean"`` (mean over categories, NaN
        skipped), columns = :data:`METRICS`, values in [0, 1]. Undefined metrics are NaN and
        one :class:`UndefinedMetricWarning` lists them all.
    Raises:
        ValueError naming the sample for bad scores, maps or masks, or an anomalous image
        without a mask while ``has_masks``.
    """
    by_class: dict[str, list[tuple[int, SampleRecord]]] = {}
    for i, r in enumerate(records):
        r = SampleRecord.coerce(r)
        by_class.setdefault(r.cls_name, []).append((i, r))
    if not by_class:
        raise ValueError("no records to evaluate")
    reasons: list[str] = []
    rows = {}
    for cls_name in sorted(by_class):
        items = by_class[cls_name]
        names = [
            f"record {i}" + (f" ({r.path})" if r.path else "") + f" of {cls_name!r}"
            for i, r in items
        ]
        where = f"category {cls_name!r}: "
        row = _image_metrics(
            [r.score for _, r in items], [r.label for _, r in items], names, reasons, where
        )
        if has_masks:
            maps, masks = [], []
            for k, (_, r) in enumerate(items):
                if r.anomaly_map is None:
                    raise ValueError(f"{names[k]} has no anomaly map")
                s = np.asarray(r.anomaly_map)
                if r.mask is None:
                    if r.label:
                        raise ValueError(
                            f"anomalous {names[k]} has no mask; pass "
                            "has_masks=False for datasets with image labels only"
                        )
                    masks.append(np.zeros(s.shape, bool))
                else:
                    masks.append(r.mask)
                maps.append(s)
            sweep = pixel_sweep(maps, masks, names=names, connectivity=connectivity)
            row |= _pixel_metrics(sweep, aupro, fpr_limit, reasons, where)
        else:
            row |= dict.fromkeys(PIXEL_METRICS, math.nan)
        rows[cls_name] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(METRICS))
    table.loc["mean"] = table.mean(axis=0, skipna=True)
    table.index.name = "category"
    _warn(reasons)
    return table


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_counts(strata: Sequence, n_resamples: int, seed: int = 0) -> np.ndarray:
    """How often each item is drawn in each of ``n_resamples`` bootstrap resamples.

    Items are resampled with replacement *within* each stratum (items with equal ``strata``
    keys), as many as the stratum holds, so every resample keeps each stratum's size (e.g.
    strata = (category, label): every category keeps its normal and anomalous images, and
    every per-category metric stays defined). One ``numpy.random.default_rng(seed)`` draws
    resample after resample, each stratum in sorted key order, so the counts depend on the
    keys and the seed alone (two methods scored on the same images get the same resamples:
    paired comparisons), and the first resamples do not depend on ``n_resamples``.

    Args:
        strata: N hashable, sortable keys (one stratum for all: ``[0] * N``).
        n_resamples: R.
        seed: the resampling seed.
    Returns:
        ``(R, N)`` int64 multiplicities; each row sums to N.

    >>> c = bootstrap_counts(["a", "a", "b"], 4, seed=0)
    >>> c.shape, c.sum(1).tolist(), c[:, 2].tolist()
    ((4, 3), [3, 3, 3, 3], [1, 1, 1, 1])
    """
    keys = list(strata)
    n = len(keys)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    strata_rows = [np.asarray(groups[k]) for k in sorted(groups)]
    out = np.zeros((n_resamples, n), np.int64)
    for r in range(n_resamples):
        draws = [idx[rng.integers(0, len(idx), size=len(idx))] for idx in strata_rows]
        out[r] = np.bincount(np.concatenate(draws), minlength=n) if draws else 0
    return out


def bootstrap_se(replicates: np.ndarray) -> np.ndarray | float:
    """Bootstrap standard error: the standard deviation (ddof=1) over the resamples (axis 0).

    The bootstrap standard error of a mean of n values tends to ``std(ddof=0) / sqrt(n)`` as
    the resamples grow (tests/test_metrics.py checks it).
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    if len(replicates) < 2:
        raise ValueError("a bootstrap standard error needs at least 2 resamples")
    out = replicates.std(axis=0, ddof=1)
    return float(out) if out.ndim == 0 else out


def _clipped_area(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Trapezoid area under each row's polyline ``(x, y)`` from x = 0 to ``limit`` (rows
    ``(R, M)``, x non-decreasing from 0), the end point interpolated on its segment: the
    row-wise :func:`partial_area`."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    xe = np.minimum(x1, limit)
    width = np.clip(xe - x0, 0.0, None)
    span = x1 - x0
    t = np.divide(xe - x0, span, out=np.zeros_like(span), where=span > 0)
    ye = y0 + np.clip(t, 0.0, 1.0) * (y1 - y0)
    return (width * (y0 + ye) / 2).sum(axis=1)


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` against 0/1 ``labels`` for each row of item ``weights`` ``(R, N)``
    (ties count half): with integer weights, the AUROC of the data with item i repeated
    ``weights[r, i]`` times. NaN for a row without weight on both labels.

    >>> weighted_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]),
    ...                np.ones((1, 4))).tolist()
    [0.75]
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    _, inv = np.unique(scores, return_inverse=True)
    g = int(inv.max()) + 1 if inv.size else 0
    pos = np.stack([np.bincount(inv, weights=w * y, minlength=g) for w in weights])
    neg = np.stack([np.bincount(inv, weights=w * (1 - y), minlength=g) for w in weights])
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    return np.divide(num, den, out=np.full(len(weights), np.nan), where=den > 0)


@dataclass
class PixelHistograms:
    """One category's pixels counted per image on a common grid of score bins, so that the
    pixel metrics of any weighting of its images (a bootstrap resample) cost one small
    matrix product instead of a new sweep over every pixel.

    Bins: the ``n_quantiles + 1`` quantiles (``inverted_cdf``: actual scores) of the normal
    pixels' scores and those of the anomalous pixels' are the bin tops; a pixel falls in the
    first bin whose top is >= its score. Scores in one bin count as tied, so the metrics are
    those of the exact sweep (:func:`pixel_sweep`) up to ties inside a bin; when every
    distinct score is a bin top (at most ``n_quantiles + 1`` distinct scores of each kind)
    they are exact. Ties count as the exact sweep counts them (ROC, PR and PRO curves are
    straight across a bin).

    Attributes:
        edges: ``(B,)`` the bin tops, ascending.
        neg, pos: ``(n, B)`` normal and anomalous pixels per image and bin.
        region: ``(n, B)`` per image and bin, the sum over anomalous pixels of
            ``1 / size of the pixel's ground-truth region`` (its share in PRO).
        n_regions: ``(n,)`` ground-truth regions per image.
    """

    edges: np.ndarray
    neg: np.ndarray
    pos: np.ndarray
    region: np.ndarray
    n_regions: np.ndarray

    @classmethod
    def from_maps(cls, maps: Sequence[np.ndarray] | np.ndarray,
                  masks: Sequence[np.ndarray] | np.ndarray, *, n_quantiles: int = 2048,
                  connectivity: int = 2) -> PixelHistograms:
        """Count ``maps`` ``(n, H, W)`` against ``masks`` (regions: ``connectivity``-connected
        components of each mask, as :func:`pixel_sweep`)."""
        if len(maps) != len(masks):
            raise ValueError(f"{len(maps)} anomaly maps but {len(masks)} masks")
        structure = ndimage.generate_binary_structure(2, connectivity)
        flat = [np.asarray(m, dtype=np.float64).ravel() for m in maps]
        truth = [np.asarray(k).ravel() != 0 for k in masks]
        if any(f.shape != t.shape for f, t in zip(flat, truth)):
            raise ValueError("every mask must have its map's shape")
        q = np.linspace(0.0, 1.0, n_quantiles + 1)
        tops = []
        for kind in (False, True):
            vals = np.concatenate([f[t == kind] for f, t in zip(flat, truth)])
            if vals.size:
                tops.append(np.quantile(vals, q, method="inverted_cdf"))
        edges = np.unique(np.concatenate(tops)) if tops else np.zeros(1)
        n, b = len(flat), len(edges)
        neg, pos, region = np.zeros((n, b)), np.zeros((n, b)), np.zeros((n, b))
        n_regions = np.zeros(n)
        for i, (f, t) in enumerate(zip(flat, truth)):
            bins = np.searchsorted(edges, f, side="left")
            neg[i] = np.bincount(bins[~t], minlength=b)
            if t.any():
                labels, n_lab = ndimage.label(t.reshape(np.shape(masks[i])), structure)
                ids = labels.ravel()[t]
                pos[i] = np.bincount(bins[t], minlength=b)
                region[i] = np.bincount(bins[t], weights=1.0 / np.bincount(ids)[ids],
                                        minlength=b)
                n_regions[i] = n_lab
        return cls(edges, neg, pos, region, n_regions)

    def metrics(self, weights: np.ndarray, fpr_limit: float = FPR_LIMIT) -> dict[str, np.ndarray]:
        """Pixel AUROC, AP and (exact) AUPRO of each row of image ``weights`` ``(R, n)``, as
        ``{"pixel_auroc", "pixel_ap", "pixel_pro"}`` of ``(R,)`` arrays (NaN for a row without
        weight on normal or anomalous pixels)."""
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        # highest bin first: cumulative counts at "score >= bin"
        fp = np.cumsum((w @ self.neg)[:, ::-1], axis=1)
        tp_bin = (w @ self.pos)[:, ::-1]
        tp = np.cumsum(tp_bin, axis=1)
        pro = np.cumsum((w @ self.region)[:, ::-1], axis=1)
        n_neg, n_pos, n_reg = fp[:, -1:], tp[:, -1:], (w @ self.n_regions)[:, None]
        ok = (n_neg[:, 0] > 0) & (n_pos[:, 0] > 0)
        safe = lambda a, d: np.divide(a, d, out=np.zeros_like(a), where=d > 0)  # noqa: E731
        zero = np.zeros((len(w), 1))
        fpr = np.hstack([zero, safe(fp, n_neg)])
        auroc = _clipped_area(fpr, np.hstack([zero, safe(tp, n_pos)]), 1.0)
        ap = (tp_bin * safe(tp, tp + fp)).sum(axis=1) / np.where(ok, n_pos[:, 0], 1.0)
        aupro = _clipped_area(fpr, np.hstack([zero, safe(pro, n_reg)]), fpr_limit) / fpr_limit
        nan = np.full(len(w), np.nan)
        return {"pixel_auroc": np.where(ok, auroc, nan), "pixel_ap": np.where(ok, ap, nan),
                "pixel_pro": np.where(ok, aupro, nan)}


def resampled_metrics(maps: np.ndarray, masks: np.ndarray, scores: np.ndarray,
                      labels: np.ndarray, cls_names: Sequence[str], counts: np.ndarray, *,
                      n_quantiles: int = 2048, fpr_limit: float = FPR_LIMIT
                      ) -> dict[str, np.ndarray]:
    """The tables' metrics (per category, then the mean over categories) for each row of
    image multiplicities ``counts`` ``(R, N)`` (:func:`bootstrap_counts`).

    Image AUROC is exact (:func:`weighted_auroc`); pixel AUROC, AP and AUPRO (exact variant)
    come from :class:`PixelHistograms` (``n_quantiles``), exact up to ties inside a bin.
    Returns ``{"image_auroc", "pixel_auroc", "pixel_ap", "pixel_pro"}`` of ``(R,)`` arrays.
    """
    counts = np.atleast_2d(counts)
    names = np.asarray(cls_names)
    labels = np.asarray(labels)
    if counts.shape[1] != len(names):
        raise ValueError(f"counts have {counts.shape[1]} columns for {len(names)} images")
    per: dict[str, list[np.ndarray]] = {}
    for c in sorted(set(cls_names)):
        rows = np.flatnonzero(names == c)
        w = counts[:, rows]
        per.setdefault("image_auroc", []).append(
            weighted_auroc(np.asarray(scores)[rows], labels[rows], w))
        hist = PixelHistograms.from_maps(maps[rows], masks[rows], n_quantiles=n_quantiles)
        for k, v in hist.metrics(w, fpr_limit).items():
            per.setdefault(k, []).append(v)
    return {k: np.mean(v, axis=0) for k, v in per.items()}
