"""Tests of pfl.data.synthetic: determinism, disjoint domains, the MVTec-like tree, caching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.registration import phase_cross_correlation

from pfl.data.defects import DEFECT_KINDS
from pfl.data.synthetic import (
    DOMAINS,
    PRETRAIN_PATTERNS,
    STAMP,
    SynthConfig,
    all_sources,
    build_benchmark,
    ensure_benchmark,
    load_source,
)

SMALL = dict(image_size=48, n_train_normal=1, n_train_anomalous=1, n_test_normal=2,
             n_test_anomalous=2)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_builds_are_byte_identical_for_a_seed_whatever_the_workers(tmp_path):
    a = build_benchmark(tmp_path / "a", SynthConfig(**SMALL, workers=1))
    build_benchmark(tmp_path / "b", SynthConfig(**SMALL, workers=2))
    build_benchmark(tmp_path / "c", SynthConfig(**SMALL, seed=1, workers=1))
    ta, tb, tc = (tree_bytes(tmp_path / x) for x in "abc")
    assert set(a) == {"aux", "target", "medical"}
    assert ta == tb
    assert ta.keys() == tc.keys() and ta != tc  # another seed: same tree, other pixels
    n_png = sum(k.endswith(".png") for k in ta)
    n_cat = sum(len(DOMAINS[d]) for d in a)
    n_aux = len(DOMAINS["aux"])
    # images: test 2+2 everywhere, train 1+1 in aux; masks: one per anomalous image
    assert n_png == n_cat * 4 + n_aux * 2 + n_cat * 2 + n_aux


def test_no_photo_source_serves_two_domains():
    srcs = all_sources()  # raises on a repeated source
    assert len(srcs) == sum(len(c) for c in DOMAINS.values())
    # Compare pixels too: two names must not hide one photograph (skimage's cat is chelsea).
    digests = {}
    for src, where in srcs.items():
        img = Image.fromarray(load_source(src)).convert("L").resize((32, 32))
        h = hashlib.sha256(np.asarray(img).tobytes()).hexdigest()
        assert h not in digests, f"{where} and {digests.get(h)} share a photograph"
        digests[h] = where
    import skimage.data

    assert np.array_equal(skimage.data.cat(), skimage.data.chelsea())  # why the alias exists


def test_domains_are_big_enough_and_mix_textures_and_objects():
    for d in ("aux", "target"):
        cats = DOMAINS[d]
        assert len(cats) >= 6
        assert {c.kind for c in cats} == {"texture", "object"}
    assert len(DOMAINS["medical"]) >= 3
    names = [c.name for cats in DOMAINS.values() for c in cats]
    assert len(names) == len(set(names))


def test_pretrain_words_are_not_category_words():
    def stems(text: str) -> set[str]:
        return {w.rstrip("s") for w in text.replace("_", " ").split()}

    cat_words = set().union(*(stems(c.name) for cats in DOMAINS.values() for c in cats))
    for p in PRETRAIN_PATTERNS:
        assert not stems(p) & cat_words, p


def test_meta_json_schema_masks_and_defect_sizes(tmp_path):
    cfg = SynthConfig(**{**SMALL, "n_test_anomalous": 6}, domains=("target",), workers=1)
    root = build_benchmark(tmp_path, cfg)["target"]
    meta = json.loads((root / "meta.json").read_text())
    assert set(meta) == {"train", "test"} and meta["train"] == {}
    assert sorted(meta["test"]) == sorted(c.name for c in DOMAINS["target"])
    for cls, rows in meta["test"].items():
        kinds = [r["specie_name"] for r in rows if r["anomaly"]]
        assert kinds == list(DEFECT_KINDS)  # every kind once: balanced by construction
        for r in rows:
            assert set(r) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
            assert r["cls_name"] == cls
            im = np.asarray(Image.open(root / r["img_path"]))
            assert im.shape == (48, 48, 3) and im.dtype == np.uint8
            if r["anomaly"]:
                m = np.asarray(Image.open(root / r["mask_path"]))
                assert set(np.unique(m)) == {0, 255}
                frac = (m > 0).mean()
                assert 0.002 - 1 / 48**2 <= frac <= 0.05 + 1 / 48**2
            else:
                assert r["mask_path"] == "" and r["specie_name"] == "good"


def test_normal_views_vary_like_an_inspection_line(tmp_path):
    # Shifts only (no rotation/scale/noise): two normal views of an object differ by a
    # translation of at most 2 * max_shift, which phase correlation recovers.
    cfg = SynthConfig(image_size=128, n_train_normal=0, n_train_anomalous=0, n_test_normal=4,
                      n_test_anomalous=0, domains=("target",), max_rotation=0, max_scale=0,
                      max_brightness=0, max_contrast=0, noise=(0.0, 0.0), max_shift=8.0,
                      workers=1)
    root = build_benchmark(tmp_path, cfg)["target"]
    limit = 2 * 8.0 * 128 / 224
    for c in DOMAINS["target"]:
        if c.kind != "object":
            continue
        ims = [np.asarray(Image.open(root / c.name / f"test/good/{i:03d}.png").convert("L"),
                          float) for i in range(4)]
        shifts = [np.abs(phase_cross_correlation(ims[0], ims[i], upsample_factor=4)[0])
                  for i in range(1, 4)]
        assert max(s.max() for s in shifts) <= limit + 0.5, c.name
        assert max(s.max() for s in shifts) > 0.2, c.name  # they do move


def test_ensure_benchmark_caches_by_config_and_spares_foreign_folders(tmp_path):
    cfg = SynthConfig(**SMALL, domains=("medical",), workers=1)
    paths = ensure_benchmark(tmp_path / "b", cfg)
    meta = paths["medical"] / "meta.json"
    t0 = meta.stat().st_mtime_ns
    assert ensure_benchmark(tmp_path / "b", cfg) == paths and meta.stat().st_mtime_ns == t0
    cfg2 = SynthConfig(**{**SMALL, "n_test_normal": 3}, domains=("medical",), workers=1)
    ensure_benchmark(tmp_path / "b", cfg2)  # stale: rebuilt
    rows = json.loads(meta.read_text())["test"]["cell"]
    assert sum(r["anomaly"] == 0 for r in rows) == 3
    assert json.loads((tmp_path / "b" / STAMP).read_text())["digest"] == cfg2.digest()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a pfl synthetic benchmark"):
        ensure_benchmark(tmp_path / "mine", cfg)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown domains"):
        build_benchmark(tmp_path, SynthConfig(domains=("space",)))


def test_cli_data_synth(tmp_path, capsys):
    from pfl.cli import main

    rc = main(["data", "synth", "--out", str(tmp_path), "--size", "32", "--n-normal", "1",
               "--n-anomalous", "1", "--domains", "medical", "--workers", "1"])
    assert rc == 0 and "medical:" in capsys.readouterr().out
    rows = json.loads((tmp_path / "medical" / "meta.json").read_text())["test"]["retina"]
    assert [r["anomaly"] for r in rows] == [0, 1]


def test_sklearn_sources_are_the_images_sklearn_loads():
    from sklearn.datasets import load_sample_image

    for name in ("flower.jpg", "china.jpg"):
        assert np.array_equal(load_source(f"sklearn:{name}"), load_sample_image(name))
