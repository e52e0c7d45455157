"""Benchmark: exact AUPRO (label once, one sweep) against the 200-threshold relabelling loop.

Both run in this one process on the same synthetic maps (blobs of anomaly, Gaussian-blurred
scores, float32), so the printed speed ratio is measured, not quoted. Usage::

    python benchmarks/metrics.py                 # 100 maps of 256 x 256
    python benchmarks/metrics.py --n 20 --size 518

The exact and the common AUPRO are different numbers by definition (docs/reproduction.md, "Metrics";
pfl/metrics.py); the fast implementation of the common variant must equal the loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from pfl.run import metrics


def synthetic_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 maps and uint8 masks; ~70% of images hold 1-3 elliptic blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if rng.random() < 0.7:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.1, 0.9, 2) * size
                ry, rx = rng.uniform(0.02, 0.12, 2) * size
                masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    noise = rng.standard_normal((n, size, size)).astype(np.float32)
    maps = masks + 6.0 * noise  # the blur (sigma = size / 64) divides it by ~14
    for i in range(n):
        maps[i] = ndimage.gaussian_filter(maps[i], sigma=size / 64)
    return maps.astype(np.float32), masks


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of maps")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    maps, masks = synthetic_maps(args.n, args.size, args.seed)
    print(
        f"{args.n} maps of {args.size}x{args.size} ({maps.size / 1e6:.1f} M pixels, "
        f"{masks.mean():.1%} anomalous)"
    )
    exact, t_exact = timed(metrics.aupro, maps, masks, variant="exact")
    common, t_common = timed(metrics.aupro, maps, masks, variant="common")
    all_four, t_all = timed(metrics.pixel_metrics, maps, masks)
    ref, t_ref = timed(metrics.aupro_common_reference, maps, masks)
    print(f"exact AUPRO (label once, one sweep)      {exact:.6f}  {t_exact:8.3f} s")
    print(f"common AUPRO, fast (same sweep)          {common:.6f}  {t_common:8.3f} s")
    print(f"common AUPRO, 200-threshold relabel loop {ref:.6f}  {t_ref:8.3f} s")
    print(
        f"all four pixel metrics (one sweep)       {t_all:8.3f} s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in all_four.items())
    )
    print(f"|fast common - loop| = {abs(common - ref):.2e}")
    print(f"speed ratio loop / exact = {t_ref / t_exact:.1f}x")


if __name__ == "__main__":
    main()
