"""Synthetic defects with exact pixel masks: scratches, holes, stains, cut-paste, blends, gaps.

``paint_defect`` changes pixels only inside the mask it returns, so the mask is the exact
ground truth (issue 9). Shapes come from one trick: a score field over the image whose top
``n`` pixels form the defect, so the area is exactly ``n = round(a * H * W)`` pixels, with the
fraction ``a`` drawn log-uniform in ``area`` (VisA's defects are as small as ~0.2% of the image,
MVTec-AD's often ~5%). The structural blend follows DRAEM (Zavrtanik et al., ICCV 2021): a
thresholded smooth-noise shape filled with ``(1 - beta) * texture + beta * image``. A defect
whose mean absolute change inside the mask is below ``min_change`` grey levels is redrawn.

    >>> import numpy as np
    >>> from pfl.data.patterns import pattern_image
    >>> rng = np.random.default_rng(0)
    >>> img = pattern_image("stripes", rng, 64)
    >>> out, mask, kind = paint_defect(img, rng, kind="stain", area=(0.02, 0.02))
    >>> int(mask.sum()) == round(0.02 * 64 * 64), kind
    (True, 'stain')
    >>> bool((out[~mask] == img[~mask]).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pfl.data.patterns import PATTERNS, pattern_image, value_noise

DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole", "stain", "cut_paste", "blend", "missing")

# Caption adjectives per kind (the "state words" of a defective caption).
DEFECT_WORDS: dict[str, tuple[str, ...]] = {
    "scratch": ("scratched",),
    "hole": ("holed", "spotted"),
    "stain": ("stained",),
    "cut_paste": ("damaged",),
    "blend": ("cracked", "contaminated"),
    "missing": ("broken",),
}


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def top_n_mask(score: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the ``n`` highest entries of ``score`` (H, W): exactly ``n`` pixels."""
    n = int(np.clip(n, 1, score.size))
    flat = score.ravel()
    keep = np.argpartition(-flat, n - 1)[:n]
    mask = np.zeros(flat.shape, bool)
    mask[keep] = True
    return mask.reshape(score.shape)


def blob_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    roughness: float = 0.4,
    rect: bool = False,
    aspect: float | None = None,
) -> np.ndarray:
    """An irregular blob (or rotated rectangle) of exactly ``n`` pixels, (H, W) bool.

    Score = -(elliptical radius)^2 (or the rectangle's L-inf radius) + roughness * smooth noise,
    about a random centre away from the border; the top n pixels form the blob.
    """
    h, w = shape
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    ar = aspect if aspect is not None else float(np.exp(rng.uniform(-0.7, 0.7)))
    th = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
    v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
    r0 = np.sqrt(n / np.pi)  # radius of a disc of n pixels sets the noise scale
    if rect:
        rad = np.maximum(np.abs(u) * np.sqrt(ar), np.abs(v) / np.sqrt(ar)) / r0
    else:
        rad = np.sqrt(u**2 * ar + v**2 / ar) / r0
    score = -(rad**2)
    if roughness > 0:
        cells = max(h, w) / max(r0, 1.0) * 1.5  # about 1.5 noise cells across the blob
        score = score + roughness * value_noise(rng, (h, w), cells, 2)
    return top_n_mask(score, n)


def curve_mask(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """A thin curved stroke (a quadratic Bezier) of exactly ``n`` pixels, (H, W) bool.

    Width 1.5-4 px at 224 px (scaled with the image); the length follows from ``n / width``.
    """
    h, w = shape
    side = max(h, w)
    width = rng.uniform(1.5, 4.0) * side / 224
    length = n / width
    if length > 0.8 * side:  # too long to fit: make it thicker instead
        length = 0.8 * side
    p0 = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
    ang = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.sin(ang), np.cos(ang)])
    p2 = np.clip(p2, [0, 0], [h - 1, w - 1])
    bend = rng.uniform(-0.3, 0.3) * length
    p1 = (p0 + p2) / 2 + bend * np.array([np.cos(ang), -np.sin(ang)])
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (48, 2) along the curve
    # Distance of every pixel to the nearest curve sample, inside the curve's bounding box.
    pad = int(np.ceil(width + n / max(length, 1.0))) + 2
    y0, x0 = (np.floor(pts.min(0)) - pad).astype(int).clip(0)
    y1, x1 = np.ceil(pts.max(0) + pad + 1).astype(int)
    y1, x1 = min(y1, h), min(x1, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    d2 = ((yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2)
    score = np.full((h, w), -np.inf)
    score[y0:y1, x0:x1] = -d2.min(axis=0) + 1e-6 * rng.standard_normal((y1 - y0, x1 - x0))
    return top_n_mask(score, n)


def _contrast_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random saturated colour far from the local mean colour ``local`` (3,)."""
    best, best_d = None, -1.0
    for _ in range(6):
        c = rng.uniform(0, 255, 3)
        c[rng.integers(3)] *= rng.uniform(0, 0.4)  # pull one channel down: saturated
        d = float(np.abs(c - local).mean())
        if d > best_d:
            best, best_d = c, d
    return best


def _scratch(img, rng, n, source):
    mask = curve_mask(rng, img.shape[:2], n)
    local = img[mask].mean(0)
    bright = _luma(local) < 128
    target = local + (255 - local) * 0.75 if bright else local * 0.25
    vals = target + rng.normal(0, 6, size=(int(mask.sum()), 3))
    out = img.copy()
    out[mask] = vals
    return out, mask


def _hole(img, rng, n, source):
    mask = blob_mask(rng, img.shape[:2], n, roughness=rng.uniform(0.0, 0.3))
    out = img.copy()
    local = img[mask].mean(0)
    # Darker towards the centre (a pit); a bright spot on already dark images.
    ys, xs = np.nonzero(mask)
    r = np.hypot(ys - ys.mean(), xs - xs.mean())
    r = r / (r.max() + 1e-9)
    if _luma(local) > 60:
        shade = (0.08 + 0.25 * r)[:, None] * local[None, :] * rng.uniform(0.6, 1.0)
    else:
        shade = (220 - 60 * r)[:, None] * np.ones(3)
    out[mask] = shade
    return out, mask


def _stain(img, rng, n, source):
    mask = blob_mask(rng, img.shape[:2], n, roughness=rng.uniform(0.4, 1.2))
    local = img[mask].mean(0)
    col = _contrast_colour(rng, local)
    ys, xs = np.nonzero(mask)
    alpha = rng.uniform(0.45, 0.85) + 0.1 * value_noise(rng, img.shape[:2], 8)[ys, xs]
    alpha = np.clip(alpha, 0.3, 0.95)[:, None]
    out = img.copy()
    out[mask] = (1 - alpha) * img[mask] + alpha * col
    return out, mask


def _cut_paste(img, rng, n, source):
    h, w = img.shape[:2]
    rect = bool(rng.integers(2))
    mask = blob_mask(rng, (h, w), n, roughness=0.0 if rect else 0.5, rect=rect)
    src = img if source is None else source
    if src.ndim == 2:
        src = np.stack([src] * 3, -1)
    sh, sw = src.shape[:2]
    ys, xs = np.nonzero(mask)
    # Take the patch from a random offset of the source (a different place if it is the same
    # image), mirrored half the time, with a small brightness change.
    by, bx = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    oy = rng.integers(0, max(sh - by, 0) + 1) - ys.min()
    ox = rng.integers(0, max(sw - bx, 0) + 1) - xs.min()
    sy, sx = np.clip(ys + oy, 0, sh - 1), np.clip(xs + ox, 0, sw - 1)
    if rng.integers(2):
        sx = np.clip(xs.max() + xs.min() - xs + ox, 0, sw - 1)
    patch = src[sy, sx, :3].astype(np.float64) * rng.uniform(0.8, 1.2)
    out = img.copy()
    out[mask] = patch
    return out, mask


def _blend(img, rng, n, source):
    h, w = img.shape[:2]
    # DRAEM-style: fragmented smooth-noise shapes, kept near one centre by a wide bump.
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    y, x = np.mgrid[0:h, 0:w]
    r0 = np.sqrt(n / np.pi)
    bump = -(((y - cy) ** 2 + (x - cx) ** 2) / (2.5 * r0) ** 2)
    noise = value_noise(rng, (h, w), max(h, w) / max(r0, 1.0) * 2.0, 3)
    mask = top_n_mask(noise + bump, n)
    ys, xs = np.nonzero(mask)
    if source is None:
        # Only the mask's bounding box needs texture: draw a pattern that size (fast).
        side = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
        name = PATTERNS[int(rng.integers(len(PATTERNS)))]
        tex = pattern_image(name, rng, max(side, 8)).astype(np.float64)
        vals = tex[ys - ys.min(), xs - xs.min()]
    else:
        src = source if source.ndim == 3 else np.stack([source] * 3, -1)
        vals = src[ys % src.shape[0], xs % src.shape[1], :3].astype(np.float64)  # tiled
    beta = rng.uniform(0.0, 0.5)
    out = img.copy()
    out[mask] = (1 - beta) * vals + beta * img[mask]
    return out, mask


def _missing(img, rng, n, source):
    mask = blob_mask(rng, img.shape[:2], n, roughness=rng.uniform(0.1, 0.6), rect=False)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)
    fill = np.median(border, axis=0)  # the background showing through the gap
    if np.abs(fill - img[mask].mean(0)).mean() < 40:
        fill = np.where(_luma(fill) > 128, 15.0, 235.0) * np.ones(3)
    out = img.copy()
    out[mask] = fill + rng.normal(0, 3, size=(int(mask.sum()), 3))
    return out, mask


_PAINTERS: dict[str, Callable] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "cut_paste": _cut_paste,
    "blend": _blend,
    "missing": _missing,
}


def paint_defect(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    area: tuple[float, float] = (0.002, 0.05),
    source: np.ndarray | None = None,
    min_change: float = 12.0,
    max_tries: int = 25,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one visible defect: ``(defective (H, W, 3) uint8, mask (H, W) bool, kind)``.

    Args:
        image: (H, W, 3) uint8 (a gray (H, W) image is stacked to RGB).
        kind: one of ``DEFECT_KINDS``; None draws one uniformly.
        area: range of the defect's area as a fraction of the image, drawn log-uniform.
        source: image for "cut_paste" (a patch of it is pasted; None: the image itself) and
            "blend" (the blended texture; None: a random procedural pattern).
        min_change: least mean absolute change (grey levels, over mask pixels and channels)
            for the defect to count as visible; weaker draws are redrawn.
    Raises:
        ValueError: unknown kind, bad area, or no visible defect after ``max_tries`` draws
            (the image is too uniform for this kind).
    """
    if kind is not None and kind not in _PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECT_KINDS}")
    lo, hi = area
    if not 0 < lo <= hi < 1:
        raise ValueError(f"area must satisfy 0 < lo <= hi < 1, got {area}")
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    f = img.astype(np.float64)
    for _ in range(max_tries):
        k = kind if kind is not None else DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        a = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        n = max(1, round(a * h * w))
        out, mask = _PAINTERS[k](f, rng, n, source)
        out = np.clip(out, 0, 255).round().astype(np.uint8)
        change = np.abs(out[mask].astype(np.float64) - f[mask]).mean()
        if change >= min_change:
            return out, mask, k
    raise ValueError(
        f"no visible {kind or 'defect'} (mean change >= {min_change}) after {max_tries} draws;"
        " the image is too uniform: lower min_change or pick another kind"
    )
