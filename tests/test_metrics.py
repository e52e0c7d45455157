"""Tests of pfl.run.metrics against scikit-learn, brute force and hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pfl.run import metrics

TOL = 1e-9


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int, p_anomalous=0.6) -> np.ndarray:
    """(n, h, w) uint8 masks: some images with 1-3 rectangles, the rest all normal."""
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        if rng.random() < p_anomalous:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                masks[i, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
    masks[0, 1:3, 1:3] = 1  # at least one anomalous region
    return masks


def noisy_maps(rng, masks, levels: int | None = 20) -> np.ndarray:
    """float32 scores correlated with the masks; quantised to ``levels`` values to force ties."""
    s = masks * 0.6 + rng.random(masks.shape)
    if levels:
        s = np.round(s * levels) / levels
    return s.astype(np.float32)


def sklearn_f1max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return float(f1.max())


def brute_force_aupro(maps, masks, limit, connectivity=2) -> float:
    """Every distinct score is a threshold; PRO and FPR counted directly; clipped trapezoids."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    regions, normal = [], []
    for s, m in zip(maps, masks):
        lab, n = ndimage.label(m, structure)
        regions += [s[lab == k] for k in range(1, n + 1)]
        normal.append(s[m == 0])
    normal = np.concatenate(normal)
    pts = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([np.ravel(s) for s in maps]))[::-1]:
        pts.append((np.mean(normal >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


# ----------------------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(y * 0.5 + rng.random(60), 1)  # ties
    out = metrics.image_metrics(s, y)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["image_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["image_f1max"] == pytest.approx(sklearn_f1max(y, s), abs=TOL)


@pytest.mark.parametrize("levels", [None, 20])
@pytest.mark.parametrize("chunk", [1 << 24, 37])
def test_pixel_metrics_equal_sklearn(levels, chunk):
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 8, 12, 15)
    maps = noisy_maps(rng, masks, levels)
    sweep = metrics.pixel_sweep(maps, masks, chunk_pixels=chunk)
    y, s = masks.ravel(), maps.ravel()
    assert sweep.values.dtype == np.float32  # no float64 copy of the scores
    assert sweep.auroc() == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert sweep.ap() == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert sweep.f1_max() == pytest.approx(sklearn_f1max(y, s), abs=TOL)


def test_pixel_metrics_accept_maps_of_different_sizes():
    rng = np.random.default_rng(4)
    masks = [blob_masks(rng, 1, 10, 12)[0], blob_masks(rng, 1, 7, 9)[0]]
    maps = [noisy_maps(rng, m) for m in masks]
    out = metrics.pixel_metrics(maps, masks)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["pixel_pro"] == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=TOL)


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 6, 16, 16)
    perfect = masks.astype(np.float32) + 0.1 * rng.random(masks.shape, np.float32)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0, abs=TOL)
    inverted = -perfect
    assert metrics.aupro(inverted, masks) < 1e-3


def test_aupro_two_regions_by_hand():
    # region A = pixels 0-1, region B = pixels 3-6, normal = pixels 2, 7, 8, 9 (FPR step 1/4).
    mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0]])
    score = np.array([[0.9, 0.9, 0.85, 0.8, 0.8, 0.3, 0.3, 0.1, 0.1, 0.1]], np.float32)
    # thresholds 0.9: A whole -> (FPR 0, PRO 1/2); 0.85: (1/4, 1/2); 0.8: B half -> (1/4, 3/4);
    # 0.3: (1/4, 1); area to FPR 0.3 = 1/2 * 1/4 + 1 * (0.3 - 1/4) = 0.175; / 0.3 = 7/12.
    assert metrics.aupro([score], [mask]) == pytest.approx(7 / 12, abs=TOL)
    assert metrics.aupro([score], [mask], fpr_limit=1.0) == pytest.approx(0.125 + 0.75, abs=TOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_exact_aupro_equals_brute_force(seed, limit):
    rng = np.random.default_rng(10 + seed)
    masks = blob_masks(rng, 4, 9, 11)
    maps = noisy_maps(rng, masks, levels=[None, 8][seed % 2])
    got = metrics.aupro(maps, masks, fpr_limit=limit, connectivity=1 + seed % 2)
    want = brute_force_aupro(maps, masks, limit, connectivity=1 + seed % 2)
    assert got == pytest.approx(want, abs=TOL)


def test_connectivity_counts_diagonal_neighbours():
    mask = np.eye(4, dtype=np.uint8)[None]  # four pixels touching only at corners
    maps = np.random.default_rng(0).random((1, 4, 4)).astype(np.float32)
    assert metrics.pixel_sweep(maps, mask, connectivity=2).n_regions == 1
    assert metrics.pixel_sweep(maps, mask, connectivity=1).n_regions == 4


@pytest.mark.parametrize("seed", range(3))
def test_common_aupro_equals_straightforward_loop(seed):
    rng = np.random.default_rng(20 + seed)
    masks = blob_masks(rng, 5, 12, 12)
    maps = noisy_maps(rng, masks, levels=None)
    fast = metrics.aupro(maps, masks, variant="common")
    slow = metrics.aupro_common_reference(maps, masks)
    assert fast == pytest.approx(slow, abs=TOL)
    assert 0.0 <= fast <= 1.0


def test_common_thresholds_match_arange_grid():
    lo, hi = np.float32(0.125), np.float32(0.875)
    grid = np.arange(0.125, 0.875, 0.75 / 200)[:200]
    np.testing.assert_allclose(metrics.common_thresholds(lo, hi), grid, rtol=1e-6)
    assert len(metrics.common_thresholds(lo, hi)) == metrics.COMMON_THRESHOLDS


# ----------------------------------------------------------------------------- edge cases


def one_warning(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    undefined = [w for w in caught if issubclass(w.category, metrics.UndefinedMetricWarning)]
    assert len(undefined) == 1, [str(w.message) for w in caught]
    return out, str(undefined[0].message)


@pytest.mark.parametrize("label", [0, 1])
def test_one_image_class_gives_nan_and_one_warning(label):
    out, msg = one_warning(metrics.image_metrics, [0.1, 0.5, 0.7], [label] * 3)
    assert all(math.isnan(v) for v in out.values())
    assert ("normal" if label == 0 else "anomalous") in msg


def test_no_anomalous_pixels_gives_nan_and_one_warning():
    maps = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    out, msg = one_warning(metrics.pixel_metrics, maps, np.zeros((3, 5, 5)))
    assert set(out) == set(metrics.PIXEL_METRICS)
    assert all(math.isnan(v) for v in out.values())
    assert "no anomalous pixels" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_map_names_the_sample(bad):
    maps = np.zeros((3, 4, 4), np.float32)
    maps[2, 1, 1] = bad
    with pytest.raises(ValueError, match=r"sample 2 \(c/002.png\).*NaN or inf"):
        metrics.pixel_metrics(maps, np.zeros((3, 4, 4)), paths=["a", "b", "c/002.png"])
    with pytest.raises(ValueError, match="sample 1"):
        metrics.image_metrics([0.1, bad, 0.2], [0, 1, 0])


def test_bad_masks_are_named():
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="sample 1.*0 and 1"):
        metrics.pixel_metrics(maps, np.stack([np.zeros((4, 4)), np.full((4, 4), 0.5)]))
    with pytest.raises(ValueError, match="sample 0.*shape"):
        metrics.pixel_metrics(maps, np.zeros((2, 4, 5)))


# ----------------------------------------------------------------------------- records


def make_records(rng, categories=("b_cls", "a_cls")):
    records = []
    for c in categories:
        masks = blob_masks(rng, 6, 10, 10)
        masks[-1] = 0  # at least one normal image
        maps = noisy_maps(rng, masks)
        for k, (s, m) in enumerate(zip(maps, masks)):
            label = int(m.any())
            records.append(
                metrics.SampleRecord(c, float(s.max() + rng.random()), label, s, m, f"{c}/{k}.png")
            )
    return records


def test_evaluate_records_per_category_and_mean():
    records = make_records(np.random.default_rng(30))
    table = metrics.evaluate_records(records)
    assert list(table.index) == ["a_cls", "b_cls", "mean"]
    assert list(table.columns) == list(metrics.METRICS)
    for c in ("a_cls", "b_cls"):
        rs = [r for r in records if r.cls_name == c]
        img = metrics.image_metrics([r.score for r in rs], [r.label for r in rs])
        pix = metrics.pixel_metrics([r.anomaly_map for r in rs], [r.mask for r in rs])
        for k, v in (img | pix).items():
            assert table.loc[c, k] == pytest.approx(v, abs=TOL)
    np.testing.assert_allclose(table.loc["mean"], table.loc[["a_cls", "b_cls"]].mean(), atol=TOL)


def test_evaluate_records_one_warning_for_all_undefined_categories():
    rng = np.random.default_rng(31)
    records = make_records(rng, ("good",))
    for c in ("only_bad", "only_ok"):
        for k in range(3):
            m = np.zeros((10, 10), np.uint8)
            if c == "only_bad":
                m[2:4, 2:4] = 1
            s = noisy_maps(rng, m)
            records.append(
                dict(
                    cls_name=c,
                    score=float(k),
                    label=int(m.any()),
                    anomaly_map=s,
                    mask=m if m.any() else None,
                )
            )
    table, msg = one_warning(metrics.evaluate_records, records)
    assert "'only_bad'" in msg and "'only_ok'" in msg and "no anomalous pixels" in msg
    assert math.isnan(table.loc["only_bad", "image_auroc"])
    assert not math.isnan(table.loc["only_bad", "pixel_pro"])
    assert math.isnan(table.loc["only_ok", "pixel_auroc"])
    # the mean skips undefined categories
    assert table.loc["mean", "image_auroc"] == pytest.approx(table.loc["good", "image_auroc"])


def test_evaluate_records_without_masks():
    records = [metrics.SampleRecord("x", i % 2 + i / 10, i % 2, None, None) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = metrics.evaluate_records(records, has_masks=False)
    assert table.loc["x", "image_auroc"] == 1.0
    assert table[list(metrics.PIXEL_METRICS)].isna().all().all()
    maps = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"record 1 \(p1\).*no mask.*has_masks=False"):
        metrics.evaluate_records(
            [metrics.SampleRecord("x", float(i), i % 2, maps, None, f"p{i}") for i in range(4)]
        )


# --- bootstrap ---------------------------------------------------------------------------------
def test_bootstrap_se_of_a_mean_matches_the_analytic_one():
    from pfl.run.metrics import bootstrap_counts, bootstrap_se

    x = np.random.default_rng(3).exponential(size=60)
    counts = bootstrap_counts([0] * len(x), 4000, seed=1)
    assert (counts.sum(1) == len(x)).all()
    # sd of the bootstrap distribution -> sd(ddof=0)/sqrt(n); MC error ~1/sqrt(2R) = 1.1 %
    assert bootstrap_se(counts @ x / len(x)) == pytest.approx(x.std() / np.sqrt(len(x)),
                                                              rel=0.05)
    # stratified: var of the overall mean = sum_h (n_h / n)^2 sd_h^2 / n_h
    strata = np.repeat([0, 1], [20, 40])
    y = np.where(strata == 0, 5.0, 0.0) + np.random.default_rng(4).normal(size=60)
    c = bootstrap_counts(strata.tolist(), 4000, seed=2)
    assert (c[:, strata == 0].sum(1) == 20).all() and (c[:, strata == 1].sum(1) == 40).all()
    want = np.sqrt(sum((np.sum(strata == h) / 60) ** 2 * y[strata == h].var()
                       / np.sum(strata == h) for h in (0, 1)))
    assert bootstrap_se(c @ y / 60) == pytest.approx(want, rel=0.05)
    # fixed seed: the same resamples
    np.testing.assert_array_equal(bootstrap_counts(strata.tolist(), 5, seed=2), c[:5])


def test_weighted_auroc_equals_repeated_data():
    from pfl.run.metrics import weighted_auroc

    rng = np.random.default_rng(0)
    s = np.round(rng.random(30), 1)  # ties
    y = rng.integers(0, 2, 30)
    w = rng.integers(0, 3, (4, 30))
    got = weighted_auroc(s, y, w)
    for r in range(4):
        rep = np.repeat(np.arange(30), w[r])
        assert got[r] == pytest.approx(roc_auc_score(y[rep], s[rep]), abs=1e-12)


def _category(rng, n=8, size=16):
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n // 2):
        masks[i, 2 + i:6 + i, 3:7] = 1
        masks[i, 10:12, 9:14] = 1  # two regions
    maps = np.round(rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size)), 2)
    return maps, masks


def test_pixel_histograms_are_exact_when_bins_hold_every_score():
    from pfl.run.metrics import PixelHistograms

    rng = np.random.default_rng(1)
    maps, masks = _category(rng)
    hist = PixelHistograms.from_maps(maps, masks)
    w = np.vstack([np.ones(8), rng.integers(0, 3, 8), [3, 0, 1, 0, 2, 1, 0, 1]])
    got = hist.metrics(w)
    for r in range(3):
        rep = np.repeat(np.arange(8), w[r].astype(int))
        want = metrics.pixel_metrics(maps[rep], masks[rep])
        for k in ("pixel_auroc", "pixel_ap", "pixel_pro"):
            assert got[k][r] == pytest.approx(want[k], abs=1e-12), (k, r)


def test_pixel_histograms_approximate_continuous_scores():
    from pfl.run.metrics import PixelHistograms

    rng = np.random.default_rng(2)
    maps = rng.random((20, 48, 48))
    masks = np.zeros(maps.shape, np.uint8)
    masks[:10, 10:20, 5:30] = 1
    maps = maps + 0.4 * masks
    got = PixelHistograms.from_maps(maps, masks, n_quantiles=512).metrics(np.ones((1, 20)))
    want = metrics.pixel_metrics(maps, masks)
    for k, v in got.items():
        assert v[0] == pytest.approx(want[k], abs=2e-3), k


def test_resampled_metrics_average_the_categories():
    from pfl.run.metrics import bootstrap_counts, resampled_metrics

    rng = np.random.default_rng(5)
    (ma, ka), (mb, kb) = _category(rng), _category(rng)
    maps, masks = np.concatenate([ma, mb]), np.concatenate([ka, kb])
    labels = (masks.reshape(16, -1).max(1) > 0).astype(int)
    scores = maps.reshape(16, -1).max(1)
    names = ["a"] * 8 + ["b"] * 8
    counts = np.vstack([np.ones(16, int), bootstrap_counts(list(zip(names, labels)), 3)])
    got = resampled_metrics(maps, masks, scores, labels, names, counts)
    table = metrics.evaluate_records([{"cls_name": c, "score": s, "label": y, "anomaly_map": m,
                               "mask": k} for c, s, y, m, k in
                              zip(names, scores, labels, maps, masks)])
    for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_pro"):
        assert got[k][0] == pytest.approx(table.loc["mean", k], abs=1e-12), k
        assert got[k].shape == (4,) and np.isfinite(got[k]).all()
