"""Procedural texture patterns (numpy only): the pretraining domain of the offline benchmark.

Each pattern is a scalar field t(y, x) in [0, 1] built on rotated pixel coordinates, mapped
through a random colour palette and given a little sensor noise. Names are plain words, so a
caption such as "a photo of a flawless wood rings pattern" reads well (issue 9;
docs/reproduction.md, "Measured on this kind of machine": the tiny tower is pretrained on such
patterns).

    >>> import numpy as np
    >>> img = pattern_image("stripes", np.random.default_rng(0), 32)
    >>> img.shape, img.dtype
    ((32, 32, 3), dtype('uint8'))
    >>> bool((pattern_image("mosaic", np.random.default_rng(1), 32)
    ...       == pattern_image("mosaic", np.random.default_rng(1), 32)).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PATTERNS: tuple[str, ...] = (
    "stripes",
    "checkerboard",
    "dots",
    "mosaic",
    "wood rings",
    "noise field",
    "waves",
    "grid",
    "marble",
    "zigzag",
    "plaid",
    "spiral",
)


def value_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: float, octaves: int = 1
) -> np.ndarray:
    """Smooth random field (H, W), zero mean and unit std: bilinear-smoothstep value noise.

    ``cells`` is the number of lattice cells across the larger side of the first octave; each
    further octave doubles it and halves the amplitude (fractal noise, as Perlin's turbulence).
    """
    h, w = shape
    out = np.zeros((h, w), np.float64)
    amp = 1.0
    for o in range(octaves):
        g = max(1.0, cells * 2**o)
        gy, gx = int(np.ceil(g * h / max(h, w))) + 2, int(np.ceil(g * w / max(h, w))) + 2
        lattice = rng.standard_normal((gy, gx))
        # A random sub-cell offset, so octaves do not share lattice lines.
        ys = np.arange(h) * (g / max(h, w)) + rng.uniform(0, 1)
        xs = np.arange(w) * (g / max(h, w)) + rng.uniform(0, 1)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = ys - y0, xs - x0
        sy, sx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: C1 at nodes
        # Separable: interpolate along x on the lattice rows, then along y.
        rows = lattice[:, x0] * (1 - sx) + lattice[:, x0 + 1] * sx  # (gy, W)
        out += amp * (rows[y0] * (1 - sy)[:, None] + rows[y0 + 1] * sy[:, None])
        amp *= 0.5
    out -= out.mean()
    return out / (out.std() + 1e-12)


def random_palette(rng: np.random.Generator, n: int = 2, min_dist: float = 90.0) -> np.ndarray:
    """(n, 3) float RGB colours in [0, 255], the first two at least ``min_dist`` apart."""
    for _ in range(100):
        cols = rng.uniform(0, 255, size=(n, 3))
        if np.linalg.norm(cols[0] - cols[1]) >= min_dist:
            return cols
    cols[1] = 255.0 - cols[0]
    return cols


def apply_palette(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a field t in [0, 1] (H, W) through palette stops (n, 3) -> (H, W, 3) float."""
    stops = np.linspace(0.0, 1.0, len(palette))
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.interp(t, stops, palette[:, c]) for c in range(3)], axis=-1)


def _sharpen(s: np.ndarray, hardness: float) -> np.ndarray:
    """s in [-1, 1] -> [0, 1]; hardness ~0.5 keeps a sine soft, ~8 makes it a hard edge."""
    return 0.5 + 0.5 * np.tanh(hardness * s) / np.tanh(hardness)


def _coords(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates about the centre, rotated by a random angle: (U, V), each (S, S)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    th = rng.uniform(0, np.pi)
    return x * np.cos(th) + y * np.sin(th), -x * np.sin(th) + y * np.cos(th)


def _period(rng: np.random.Generator, size: int, lo: float = 0.03, hi: float = 0.2) -> float:
    """A period in pixels, log-uniform between lo and hi of the image side (at least 4 px)."""
    return max(4.0, size * float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


def _stripes(rng, size):
    u, _ = _coords(rng, size)
    p = _period(rng, size)
    return _sharpen(np.sin(2 * np.pi * u / p + rng.uniform(0, 2 * np.pi)), rng.uniform(0.5, 8))


def _checkerboard(rng, size):
    u, v = _coords(rng, size)
    p = _period(rng, size, 0.05, 0.25)
    return _sharpen(np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p), rng.uniform(2, 10))


def _dots(rng, size):
    u, v = _coords(rng, size)
    p = _period(rng, size, 0.05, 0.2)
    r = rng.uniform(0.15, 0.4)
    fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
    d = np.sqrt(fu**2 + fv**2)
    return np.clip((r - d) / 0.04 + 0.5, 0, 1)  # a soft edge about 4% of a period wide


def _mosaic(rng, size):  # Voronoi cells
    n = int(rng.integers(8, 40))
    pts = rng.uniform(0, size, size=(n, 2)).astype(np.float32)
    shades = rng.uniform(0.3, 1.0, size=n)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    # Nearest and second-nearest seed by one pass over the seeds (a loop over n, not pixels).
    d1 = np.full((size, size), np.inf, np.float32)
    d2 = d1.copy()
    idx = np.zeros((size, size), np.int64)
    for k in range(n):
        d = np.hypot(y - pts[k, 0], x - pts[k, 1])
        closer = d < d1
        d2 = np.where(closer, d1, np.minimum(d2, d))
        d1 = np.where(closer, d, d1)
        idx[closer] = k
    border = np.clip((d2 - d1) / rng.uniform(1.5, 4.0), 0, 1)  # dark cell walls
    return shades[idx] * border


def _wood_rings(rng, size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(-0.5, 1.5, size=2) * size
    aspect = rng.uniform(0.3, 1.0)
    r = np.sqrt((x - cx) ** 2 + ((y - cy) * aspect) ** 2)
    p = _period(rng, size, 0.03, 0.1)
    r = r + rng.uniform(0.5, 2.0) * p * value_noise(rng, (size, size), 3, 2)
    return ((r / p) % 1.0) ** rng.uniform(0.5, 2.0)  # saw-tooth rings, skewed


def _noise_field(rng, size):
    n = value_noise(rng, (size, size), rng.uniform(2, 10), int(rng.integers(1, 5)))
    return 0.5 + 0.25 * n


def _waves(rng, size):
    u, v = _coords(rng, size)
    p = _period(rng, size)
    lam = _period(rng, size, 0.15, 0.6)
    amp = rng.uniform(0.3, 1.5) * p
    return _sharpen(np.sin(2 * np.pi * (u + amp * np.sin(2 * np.pi * v / lam)) / p),
                    rng.uniform(0.5, 4))


def _grid(rng, size):
    u, v = _coords(rng, size)
    p = _period(rng, size, 0.06, 0.25)
    w = rng.uniform(0.05, 0.2)
    du, dv = np.abs((u / p) % 1.0 - 0.5), np.abs((v / p) % 1.0 - 0.5)
    return np.clip((np.maximum(du, dv) - (0.5 - w)) / 0.03, 0, 1)


def _marble(rng, size):
    u, _ = _coords(rng, size)
    p = _period(rng, size, 0.1, 0.4)
    turb = value_noise(rng, (size, size), rng.uniform(2, 5), 4)
    return 0.5 + 0.5 * np.sin(2 * np.pi * u / p + rng.uniform(1.5, 5.0) * turb)


def _zigzag(rng, size):
    u, v = _coords(rng, size)
    p = _period(rng, size)
    lam = _period(rng, size, 0.05, 0.2)
    tri = 2 * np.abs((v / lam) % 1.0 - 0.5)  # triangle wave in [0, 1]
    return _sharpen(np.sin(2 * np.pi * (u + rng.uniform(0.5, 2) * lam * tri) / p),
                    rng.uniform(1, 8))


def _plaid(rng, size):
    u, v = _coords(rng, size)
    p1, p2 = _period(rng, size, 0.05, 0.2), _period(rng, size, 0.05, 0.2)
    a = _sharpen(np.sin(2 * np.pi * u / p1), rng.uniform(1, 6))
    b = _sharpen(np.sin(2 * np.pi * v / p2), rng.uniform(1, 6))
    return 0.5 * (a + b)


def _spiral(rng, size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    r, th = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
    arms = int(rng.integers(1, 6))
    p = _period(rng, size, 0.05, 0.2)
    return _sharpen(np.sin(arms * th + 2 * np.pi * r / p), rng.uniform(0.5, 6))


_FIELDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "dots": _dots,
    "mosaic": _mosaic,
    "wood rings": _wood_rings,
    "noise field": _noise_field,
    "waves": _waves,
    "grid": _grid,
    "marble": _marble,
    "zigzag": _zigzag,
    "plaid": _plaid,
    "spiral": _spiral,
}


def pattern_field(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The pattern's scalar field (size, size) in [0, 1], before colouring."""
    if name not in _FIELDS:
        raise ValueError(f"unknown pattern {name!r}; choose one of {PATTERNS}")
    return np.clip(_FIELDS[name](rng, size), 0.0, 1.0)


def pattern_image(
    name: str, rng: np.random.Generator, size: int, noise: float | None = None
) -> np.ndarray:
    """A (size, size, 3) uint8 image of pattern ``name`` with a random palette.

    Palette: 2 or 3 colour stops, the first two clearly apart; ``noise`` is the std of
    Gaussian sensor noise in grey levels (None: drawn in [0, 6]).
    """
    t = pattern_field(name, rng, size)
    pal = random_palette(rng, int(rng.integers(2, 4)))
    img = apply_palette(t, pal)
    sigma = rng.uniform(0, 6) if noise is None else noise
    if sigma > 0:
        img = img + rng.normal(0.0, sigma, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def random_pattern(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A random pattern image and its name: ``(image (size, size, 3) uint8, name)``."""
    name = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return pattern_image(name, rng, size), name
