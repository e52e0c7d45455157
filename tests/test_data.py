"""Tests of pfl.data.dataset: AnomalyDataset over meta.json, collate, augmentations, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfl.data.dataset import AnomalyDataset, Augment, BadSampleError, collate
from pfl.data.preprocess import image_to_tensor, mask_to_tensor


def entry(img: str, mask: str, cls: str, anomaly: int) -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls,
            "specie_name": "bad" if anomaly else "good", "anomaly": anomaly}


def make_root(root: Path, n: int = 2, size: int = 20, extra: dict | None = None) -> Path:
    """Two classes, n normal + n anomalous test images each, with square defect masks."""
    rng = np.random.default_rng(0)
    test = {}
    for c in ("alpha", "beta"):
        rows = []
        for i in range(2 * n):
            a = int(i >= n)
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            p = root / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
            m = ""
            if a:
                mk = np.zeros((size, size), np.uint8)
                mk[4:10, 6:14] = 255
                m = f"{c}/{i}_mask.png"
                Image.fromarray(mk).save(root / m)
            rows.append(entry(f"{c}/{i}.png", m, c, a))
        test[c] = rows
    meta = {"train": {}, "test": test} | (extra or {})
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_missing_root_and_meta_say_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pfl data synth --out"):
        AnomalyDataset(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"meta.json is missing.*data convert"):
        AnomalyDataset(tmp_path)


def test_unknown_split_and_class_list_what_exists(tmp_path):
    make_root(tmp_path)
    with pytest.raises(ValueError, match=r"no split 'val'.*\['test', 'train'\]"):
        AnomalyDataset(tmp_path, split="val")
    with pytest.raises(ValueError, match=r"\['gamma'\].*\['alpha', 'beta'\]"):
        AnomalyDataset(tmp_path, classes=["gamma"])


def test_items_match_the_preprocessing_and_meta(tmp_path):
    make_root(tmp_path)
    ds = AnomalyDataset(tmp_path, image_size=16, classes=["beta"])
    assert len(ds) == 4 and ds.labels == [0, 0, 1, 1]
    s = ds[3]
    raw = Image.open(tmp_path / "beta/3.png")
    assert torch.equal(s["image"], image_to_tensor(raw, 16))
    mk = np.asarray(Image.open(tmp_path / "beta/3_mask.png"))
    assert torch.equal(s["mask"], mask_to_tensor(mk, 16))
    assert s["mask"].sum() > 0 and s["label"] == 1 and s["cls_name"] == "beta"
    assert s["path"] == str(tmp_path / "beta/3.png") and s["has_mask"] is True
    assert ds[0]["mask"].sum() == 0


def test_collate_batches_mixed_classes(tmp_path):
    make_root(tmp_path)
    ds = AnomalyDataset(tmp_path, image_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate, shuffle=False)
    b = next(iter(loader))
    assert b["image"].shape == (5, 3, 16, 16) and b["mask"].shape == (5, 16, 16)
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 0, 1, 1, 0]
    assert b["cls_name"] == ["alpha"] * 4 + ["beta"]
    assert b["has_mask"].dtype == torch.bool and b["has_mask"].all()
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_gray_rgba_palette_and_16bit_images_become_rgb(tmp_path):
    vals = np.arange(100, dtype=np.uint8).reshape(10, 10) + 50
    Image.fromarray(vals, "L").save(tmp_path / "gray.png")
    rgba = np.dstack([vals, vals // 2, 255 - vals, np.full_like(vals, 7)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([vals] * 3)).convert("P").save(tmp_path / "pal.png")
    v16 = vals.astype(np.uint16) * 200
    Image.fromarray(v16).save(tmp_path / "deep.png")  # a 16-bit PNG
    rows = [entry(f"{n}.png", "", "x", 0) for n in ("gray", "rgba", "pal", "deep")]
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"x": rows}}))
    ds = AnomalyDataset(tmp_path, image_size=10)
    gray = image_to_tensor(np.dstack([vals] * 3), 10)
    assert torch.allclose(ds[0]["image"], gray)
    assert torch.allclose(ds[1]["image"], image_to_tensor(rgba[..., :3], 10))
    pal = Image.open(tmp_path / "pal.png")
    lut = np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)  # index -> RGB by hand
    assert torch.allclose(ds[2]["image"], image_to_tensor(lut[np.asarray(pal)], 10))
    # 16-bit is scaled by its maximum to 0..255.
    deep = np.round(v16 / v16.max() * 255).astype(np.uint8)
    assert torch.allclose(ds[3]["image"], image_to_tensor(np.dstack([deep] * 3), 10))


def test_corrupt_image_is_named_or_skipped(tmp_path):
    make_root(tmp_path)
    (tmp_path / "alpha/1.png").write_bytes(b"not a png at all")
    good = (tmp_path / "beta/0.png").read_bytes()
    (tmp_path / "beta/1.png").write_bytes(good[: len(good) // 2])  # truncated
    ds = AnomalyDataset(tmp_path)
    with pytest.raises(BadSampleError, match=r"alpha/1.png.*skip_bad=True"):
        ds[1]
    with pytest.raises(BadSampleError, match="beta/1.png"):
        ds[5]
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = AnomalyDataset(tmp_path, skip_bad=True)
    assert len(ds) == 6 and ds.bad == ["alpha/1.png", "beta/1.png"]
    assert all(ds[i]["image"].shape == (3, 224, 224) for i in range(len(ds)))


def test_missing_image_file_is_named(tmp_path):
    make_root(tmp_path)
    (tmp_path / "alpha/0.png").unlink()
    with pytest.raises(BadSampleError, match=r"alpha/0.png is missing"):
        AnomalyDataset(tmp_path)[0]


def test_anomaly_without_mask_is_an_error_unless_pixel_labels_false(tmp_path):
    make_root(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["test"]["beta"][2]["mask_path"] = ""
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadSampleError, match=r"beta/2.png has no mask_path"):
        AnomalyDataset(tmp_path)
    meta["pixel_labels"] = False
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = AnomalyDataset(tmp_path, image_size=8)
    b = collate([ds[i] for i in range(len(ds))])
    assert not b["has_mask"].any() and b["mask"].sum() == 0 and b["label"].sum() == 4


def test_mask_of_wrong_size_is_an_error_unless_resized_or_skipped(tmp_path):
    make_root(tmp_path, size=20)
    mk = np.zeros((10, 10), np.uint8)
    mk[2:5, 3:7] = 255  # half-size version of the 20 px mask
    Image.fromarray(mk).save(tmp_path / "alpha/3_mask.png")
    ds = AnomalyDataset(tmp_path, image_size=20)
    with pytest.raises(BadSampleError, match=r"alpha/3_mask.png is 10x10 but its image .*"
                       r"alpha/3.png is 20x20.*resize_masks=True"):
        ds[3]
    # found without decoding (before a model loads), and by the full check
    for decode in (False, True):
        [(img, why)] = ds.problems(decode=decode)
        assert img == "alpha/3.png" and "10x10" in why
    with pytest.warns(UserWarning, match="skipped 1"):
        skipped = AnomalyDataset(tmp_path, image_size=20, skip_bad=True)
    assert skipped.bad == ["alpha/3.png"] and "10x10" in skipped.bad_reasons["alpha/3.png"]
    ds = AnomalyDataset(tmp_path, image_size=20, resize_masks=True)
    assert ds.problems() == []
    with pytest.warns(UserWarning, match=r"alpha/3_mask.png is 10x10 but its image is 20x20"):
        s = ds[3]
    full = np.zeros((20, 20), np.uint8)
    full[4:10, 6:14] = 1
    assert torch.equal(s["mask"], torch.from_numpy(full).float())


def test_deleted_image_is_found_before_reading(tmp_path):
    make_root(tmp_path)
    (tmp_path / "beta/2.png").unlink()
    [(img, why)] = AnomalyDataset(tmp_path).problems(decode=False)
    assert img == "beta/2.png" and "beta/2.png is missing: fix meta.json" in why


@pytest.mark.parametrize("meta, message", [
    ({"test": [1, 2, 3]}, r'"test" must map class names to lists of samples, got a list'),
    ({"test": {"a": {"x": 1}}}, r'"test" / "a" must be a list of samples, got a dict'),
    ({"test": {"a": [5]}}, r'"test" / "a" sample 0 must be an object'),
    ({"test": {"a": [{"img_path": "x.png", "cls_name": "a"}]}}, r"lacks \['anomaly'\]"),
    ({"test": {"a": [{"img_path": 3, "cls_name": "a", "anomaly": 0}]}}, r"must be strings"),
    ({"test": {"a": [{"img_path": "x", "cls_name": "a", "anomaly": "yes"}]}},
     r"anomaly must be 0 or 1"),
    ([1], r"no 'train' or 'test' split"),
])
def test_malformed_meta_is_named_with_the_fix(tmp_path, meta, message):
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as err:
        AnomalyDataset(tmp_path)
    assert str(tmp_path / "meta.json") in str(err.value) and "pfl data" in str(err.value)


@pytest.mark.parametrize("kind", ["0/1", "0/255", "rgb", "16bit"])
def test_mask_encodings_agree(tmp_path, kind):
    make_root(tmp_path, size=20)
    m = np.zeros((20, 20), np.uint8)
    m[4:10, 6:14] = 1
    arr = {"0/1": m, "0/255": m * 255, "rgb": np.dstack([m * 255] * 3),
           "16bit": m.astype(np.uint16) * 65535}[kind]
    Image.fromarray(arr).save(tmp_path / "alpha/3_mask.png")
    s = AnomalyDataset(tmp_path, image_size=20)[3]
    assert torch.equal(s["mask"], torch.from_numpy(m).float())


def test_augmentation_moves_image_and_mask_together(tmp_path):
    # An image whose red channel is the mask: after augmentation they must still coincide.
    root = tmp_path
    m = np.zeros((32, 32), np.uint8)
    m[4:12, 3:20] = 255
    arr = np.dstack([m, np.full_like(m, 60), np.full_like(m, 60)])
    Image.fromarray(arr).save(root / "a.png")
    Image.fromarray(m).save(root / "a_mask.png")
    (root / "meta.json").write_text(json.dumps({"train": {"x": [entry("a.png", "a_mask.png",
                                                                      "x", 1)]}}))
    plain = AnomalyDataset(root, "train", image_size=32)[0]
    flip = AnomalyDataset(root, "train", image_size=32, augment=Augment(
        hflip=1.0, rotate=0, brightness=0, contrast=0))[0]
    assert torch.equal(flip["mask"], torch.flip(plain["mask"], [-1]))
    assert torch.allclose(flip["image"], torch.flip(plain["image"], [-1]), atol=1e-6)
    ds = AnomalyDataset(root, "train", image_size=32, augment=True, seed=3)
    draws = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        s = ds[0]
        red = s["image"][0] > 0  # red channel above the CLIP mean: the mask's pixels
        inter = (red & (s["mask"] > 0)).sum().item()
        union = (red | (s["mask"] > 0)).sum().item()
        assert inter / union > 0.85
        draws.append(s["mask"])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # epochs differ
    ds.set_epoch(2)
    assert torch.equal(ds[0]["mask"], draws[2])  # and are reproducible


def test_fingerprint_follows_file_content(tmp_path):
    make_root(tmp_path)
    a = AnomalyDataset(tmp_path).fingerprint()
    assert a == AnomalyDataset(tmp_path).fingerprint()
    img = Image.open(tmp_path / "alpha/0.png")
    img.resize((21, 21)).save(tmp_path / "alpha/0.png")
    assert AnomalyDataset(tmp_path).fingerprint()["files"] != a["files"]


def test_meta_counts_and_mask_areas(tmp_path):
    from pfl.data.dataset import mask_areas, meta_counts

    make_root(tmp_path, n=2, size=20)
    assert meta_counts(tmp_path) == [
        {"split": "test", "class": "alpha", "normal": 2, "anomalous": 2},
        {"split": "test", "class": "beta", "normal": 2, "anomalous": 2}]
    areas = mask_areas(tmp_path)
    assert len(areas) == 4 and all(r["area"] == 6 * 8 / 400 for r in areas)
