"""Tests of pfl.data.patterns (procedural textures) and pfl.data.defects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pfl.data.defects import DEFECT_KINDS, DEFECT_WORDS, blob_mask, curve_mask, paint_defect
from pfl.data.patterns import PATTERNS, pattern_field, pattern_image, random_pattern, value_noise


def test_pattern_names_are_caption_words():
    assert len(PATTERNS) >= 10 and len(set(PATTERNS)) == len(PATTERNS)
    assert all(n.replace(" ", "").isalpha() and n == n.lower() for n in PATTERNS)


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_image_deterministic_and_textured(name):
    a = pattern_image(name, np.random.default_rng(3), 64)
    b = pattern_image(name, np.random.default_rng(3), 64)
    c = pattern_image(name, np.random.default_rng(4), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # A pattern, not a flat colour: its field spans a good part of [0, 1].
    t = pattern_field(name, np.random.default_rng(3), 64)
    assert t.min() >= 0 and t.max() <= 1 and np.ptp(t) > 0.2


def test_unknown_pattern_names_the_choices():
    with pytest.raises(ValueError, match="stripes"):
        pattern_image("paisley", np.random.default_rng(0), 16)


def test_value_noise_is_standardised_and_smooth():
    n = value_noise(np.random.default_rng(0), (128, 96), cells=4)
    assert n.shape == (128, 96)
    assert abs(n.mean()) < 1e-9 and abs(n.std() - 1) < 1e-9
    # 4 cells over 128 px: neighbouring pixels are nearly the same (lag-1 correlation).
    r = np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1]
    assert r > 0.98
    white = np.random.default_rng(0).standard_normal((128, 96))
    assert np.corrcoef(white[:, :-1].ravel(), white[:, 1:].ravel())[0, 1] < 0.1


def test_defect_words_cover_every_kind():
    assert len(DEFECT_KINDS) >= 6
    assert set(DEFECT_WORDS) == set(DEFECT_KINDS)
    assert all(len(w) >= 1 and all(x.isalpha() for x in w) for w in DEFECT_WORDS.values())


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("frac", [0.002, 0.05])
def test_paint_defect_exact_mask_area_and_visibility(kind, frac):
    rng = np.random.default_rng(11)
    img, _ = random_pattern(rng, 96)
    src = pattern_image("dots", rng, 96)
    out, mask, k = paint_defect(img, rng, kind=kind, area=(frac, frac), source=src)
    assert k == kind and out.dtype == np.uint8 and out.shape == img.shape
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    assert mask.sum() == round(frac * 96 * 96)  # the area drawn is the area painted
    assert np.array_equal(out[~mask], img[~mask])  # nothing changes outside the mask
    change = np.abs(out[mask].astype(float) - img[mask].astype(float)).mean()
    assert change >= 12.0


def test_paint_defect_area_is_drawn_in_range_and_kinds_vary():
    rng = np.random.default_rng(0)
    fracs, kinds = [], set()
    for _ in range(40):
        img, _ = random_pattern(rng, 64)
        _, mask, k = paint_defect(img, rng, area=(0.002, 0.05))
        fracs.append(mask.mean())
        kinds.add(k)
    fracs = np.array(fracs)
    tol = 1 / (64 * 64)  # rounding to whole pixels
    assert fracs.min() >= 0.002 - tol and fracs.max() <= 0.05 + tol
    # Log-uniform: about half the draws fall below the geometric mean of the range.
    assert 0.2 < (fracs < np.sqrt(0.002 * 0.05)).mean() < 0.8
    assert len(kinds) >= 5


def test_invisible_defects_are_redrawn():
    # Cut-paste of a flat grey image onto itself changes only the brightness factor in
    # [0.8, 1.2], i.e. |f - 1| * 128 grey levels; draws below min_change must be rejected.
    img = np.full((48, 48, 3), 128, np.uint8)
    for seed in range(20):
        out, mask, _ = paint_defect(img, np.random.default_rng(seed), kind="cut_paste",
                                    min_change=10.0)
        assert np.abs(out[mask].astype(float) - 128).mean() >= 10.0
    with pytest.raises(ValueError, match="too uniform"):
        paint_defect(img, np.random.default_rng(0), kind="cut_paste", min_change=30.0)


def test_blend_follows_draem_formula():
    # out = (1 - beta) * texture + beta * image inside the mask, beta in [0, 0.5].
    img = np.full((64, 64, 3), 200, np.uint8)
    src = np.zeros((64, 64, 3), np.uint8)
    out, mask, _ = paint_defect(img, np.random.default_rng(5), kind="blend", source=src)
    vals = out[mask].astype(float)
    assert np.ptp(vals) <= 1  # one beta for the whole defect (rounding only)
    beta = vals.mean() / 200
    assert 0.0 <= beta <= 0.5 + 1 / 400


def test_cut_paste_copies_the_source():
    img = np.full((64, 64, 3), 220, np.uint8)
    src = np.full((80, 80, 3), 50, np.uint8)
    out, mask, _ = paint_defect(img, np.random.default_rng(2), kind="cut_paste", source=src)
    vals = out[mask].astype(float)
    assert vals.min() >= 50 * 0.8 - 0.5 and vals.max() <= 50 * 1.2 + 0.5


def test_shapes_have_exact_size_and_hang_together():
    rng = np.random.default_rng(0)
    for n in (20, 300, 2000):
        m = blob_mask(rng, (96, 80), n, roughness=0.2)
        assert m.sum() == n and ndimage.label(m)[1] <= 2
        c = curve_mask(rng, (96, 80), n)
        assert c.sum() == n and ndimage.label(c, np.ones((3, 3)))[1] <= 2
        if n <= 300:  # a stroke of a few % of the image is thin: erosion by 3 px removes it
            assert ndimage.binary_erosion(c, iterations=3).sum() < 0.2 * n


def test_paint_defect_rejects_bad_arguments():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown defect kind"):
        paint_defect(img, np.random.default_rng(0), kind="dent")
    with pytest.raises(ValueError, match="area"):
        paint_defect(img, np.random.default_rng(0), area=(0.1, 0.01))
    with pytest.raises(ValueError, match="uint8"):
        paint_defect(img.astype(float), np.random.default_rng(0))


def test_paint_defect_accepts_gray_and_is_deterministic():
    img = pattern_image("grid", np.random.default_rng(0), 48)[..., 0]
    a = paint_defect(img, np.random.default_rng(9))
    b = paint_defect(img, np.random.default_rng(9))
    assert a[0].shape == (48, 48, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
