"""Each adapter of pfl.data.adapters on a miniature tree fabricated in its published layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfl.data.adapters import ADAPTERS, adapter, convert
from pfl.data.dataset import AnomalyDataset, collate


def img(path: Path, value: int = 100, size=(12, 10), mode="RGB") -> Path:
    """A tiny image (W x H = size) at ``path``; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    arr[0, 0] = (value + 50) % 256  # not flat, so JPEG/BMP writers are exercised normally
    Image.fromarray(arr).convert(mode).save(path)
    return path


def mask(path: Path, on: bool = True, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    if on:
        m[2:6, 3:8] = 255
    Image.fromarray(m).save(path)
    return path


# Each builder writes a tree and returns what convert must find:
# {split: {class: (n_normal, n_anomalous)}}, and whether masks exist.


def build_mvtec(r: Path):
    for c in ("bottle", "wood"):
        img(r / c / "train/good/000.png")
        img(r / c / "train/good/001.png")
        img(r / c / "test/good/000.png")
        img(r / c / "test/crack/000.png", 30)
        mask(r / c / "ground_truth/crack/000_mask.png")
        img(r / c / "test/hole/000.png", 30)
        mask(r / c / "ground_truth/hole/000_mask.png")
    (r / "license.txt").write_text("x")
    return {"train": {"bottle": (2, 0), "wood": (2, 0)},
            "test": {"bottle": (1, 2), "wood": (1, 2)}}, True


def build_visa(r: Path):
    rows = ["object,split,label,image,mask"]
    for c in ("candle", "pcb1"):
        for i in range(2):
            p = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            img(r / p)
            rows.append(f"{c},train,normal,{p},")
        p = f"{c}/Data/Images/Normal/0009.JPG"
        img(r / p)
        rows.append(f"{c},test,normal,{p},")
        p, m = f"{c}/Data/Images/Anomaly/000.JPG", f"{c}/Data/Masks/Anomaly/000.png"
        img(r / p, 30)
        mask(r / m)
        rows.append(f"{c},test,anomaly,{p},{m}")
    (r / "split_csv").mkdir(parents=True)
    (r / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return {"train": {"candle": (2, 0), "pcb1": (2, 0)},
            "test": {"candle": (1, 1), "pcb1": (1, 1)}}, True


def build_btad(r: Path):
    for c, ext in (("01", ".bmp"), ("02", ".png"), ("03", ".bmp")):
        img(r / c / f"train/ok/0000{ext}")
        img(r / c / f"test/ok/0000{ext}")
        img(r / c / f"test/ko/0000{ext}", 30)
        mask(r / c / f"ground_truth/ko/0000{'.png' if c != '03' else '.bmp'}")
    return {"train": {c: (1, 0) for c in ("01", "02", "03")},
            "test": {c: (1, 1) for c in ("01", "02", "03")}}, True


def build_ksdd2(r: Path):
    k = 10000
    for split, labels in (("train", (0, 0, 0, 1)), ("test", (0, 0, 1))):
        for a in labels:
            img(r / split / f"{k}.png", 30 if a else 100)
            mask(r / split / f"{k}_GT.png", on=bool(a))
            k += 1
    # The paper's balanced set: all 2 anomalous + 2 of the 5 normal.
    return {"train": {}, "test": {"commutator": (2, 2)}}, True


def build_rsdd(r: Path):
    for t, n in (("Type-I RSDDs dataset", 2), ("Type-II RSDDs dataset", 3)):
        for i in range(n):
            img(r / t / f"Rail surface images/rail_{i}.jpg", 100, size=(40, 8))
            mask(r / t / f"GroundTruth/rail_{i}.png", on=i > 0, size=(40, 8))
    return {"train": {}, "test": {"express_rail": (1, 1), "heavy_rail": (1, 2)}}, True


def build_dagm(r: Path):
    for k in (1, 2):
        for split in ("Train", "Test"):
            img(r / f"Class{k}/{split}/0001.PNG", mode="L")
            img(r / f"Class{k}/{split}/0002.PNG", 30, mode="L")
            mask(r / f"Class{k}/{split}/Label/0002_label.PNG")
            (r / f"Class{k}/{split}/Label/Labels.txt").write_text("1\n2\t1\t0002.PNG\n")
    return {"train": {}, "test": {"texture1": (2, 2), "texture2": (2, 2)}}, True


def build_dtd(r: Path):
    for c in ("Blotchy_099", "Woven_001"):
        img(r / c / "train/good/000.png")
        img(r / c / "test/good/000.png")
        img(r / c / "test/bad/000.png", 30)
        mask(r / c / "ground_truth/bad/000.png")
    return {"train": {"Blotchy_099": (1, 0), "Woven_001": (1, 0)},
            "test": {"Blotchy_099": (1, 1), "Woven_001": (1, 1)}}, True


def build_headct(r: Path):
    (r / "head_ct/head_ct").mkdir(parents=True)
    for i in range(4):
        img(r / f"head_ct/head_ct/{i:03d}.png", mode="L")
    (r / "labels.csv").write_text("id, hemorrhage\n0,1\n1,1\n2,0\n3,0\n")
    return {"train": {}, "test": {"head_ct": (2, 2)}}, False


def build_brainmri(r: Path):
    for i in range(2):
        img(r / f"brain_tumor_dataset/no/{i} no.jpg")
    for i in range(3):
        img(r / f"brain_tumor_dataset/yes/Y{i}.jpg", 30)
    return {"train": {}, "test": {"brain_mri": (2, 3)}}, False


def build_br35h(r: Path):
    img(r / "no/no0.jpg")
    img(r / "yes/y0.jpg", 30)
    img(r / "yes/y1.jpg", 30)
    img(r / "pred/pred0.jpg")  # unlabelled: ignored
    return {"train": {}, "test": {"brain_mri": (1, 2)}}, False


def build_isic(r: Path):
    for i in (3, 12):
        img(r / f"ISBI2016_ISIC_Part1_Test_Data/ISIC_{i:07d}.jpg")
        mask(r / f"ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_{i:07d}_Segmentation.png")
    return {"train": {}, "test": {"skin": (0, 2)}}, True


def build_colondb(r: Path):
    for i in (1, 2, 3):
        img(r / f"CVC-ColonDB/images/{i}.png")
        mask(r / f"CVC-ColonDB/masks/{i}.png")
    return {"train": {}, "test": {"colon": (0, 3)}}, True


def build_clinicdb(r: Path):
    for i in (1, 2):
        img(r / f"Original/{i}.tif")
        mask(r / f"Ground Truth/{i}.tif")
    return {"train": {}, "test": {"colon": (0, 2)}}, True


def build_endo(r: Path):
    for n in ("a1", "b2"):
        img(r / f"segmented-images/images/{n}.jpg")
        mask(r / f"segmented-images/masks/{n}.jpg")
    return {"train": {}, "test": {"colon": (0, 2)}}, True


def build_kvasir(r: Path):
    for n in ("cju0", "cju1", "cju2"):
        img(r / f"Kvasir-SEG/images/{n}.jpg")
        mask(r / f"Kvasir-SEG/masks/{n}.jpg")
    return {"train": {}, "test": {"colon": (0, 3)}}, True


def build_folder(r: Path):
    img(r / "widget/good/a.png")
    img(r / "widget/good/b.png")
    img(r / "widget/dent/c.png", 30)
    mask(r / "widget/masks/dent/c_mask.png")
    return {"train": {}, "test": {"widget": (2, 1)}}, True


BUILDERS = {name[len("build_"):]: f for name, f in globals().items()
            if name.startswith("build_")}


def test_every_adapter_has_a_fabricated_tree():
    assert set(BUILDERS) == set(ADAPTERS)
    assert len(ADAPTERS) == 16  # the paper's 15 + folder


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_converts_its_published_layout(tmp_path, name):
    expected, has_masks = BUILDERS[name](tmp_path)
    meta_path = convert(name, tmp_path)
    meta = json.loads(meta_path.read_text())
    assert meta.get("pixel_labels", True) is has_masks
    for split in ("train", "test"):
        got = {c: (sum(r["anomaly"] == 0 for r in rs), sum(r["anomaly"] == 1 for r in rs))
               for c, rs in meta[split].items()}
        assert got == expected[split], split
        for rs in meta[split].values():
            for r in rs:
                assert (tmp_path / r["img_path"]).is_file()
                assert not Path(r["img_path"]).is_absolute()
                if has_masks and r["anomaly"]:
                    assert (tmp_path / r["mask_path"]).is_file()
                else:
                    assert r["mask_path"] == ""
    # The dataset class reads what the adapter wrote; anomalous masks carry defect pixels.
    ds = AnomalyDataset(tmp_path, split="test", image_size=16)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (len(ds), 3, 16, 16)
    assert batch["has_mask"].all().item() is has_masks
    anomalous = batch["label"] == 1
    if has_masks:
        assert (batch["mask"][anomalous].flatten(1).sum(1) > 0).all()
    assert batch["mask"][~anomalous].sum() == 0


def test_meta_can_go_to_another_folder(tmp_path):
    build_mvtec(tmp_path / "ro")
    out = convert("MVTec-AD", tmp_path / "ro", out=tmp_path / "index")
    assert out == tmp_path / "index" / "meta.json"
    ds = AnomalyDataset(tmp_path / "index")
    assert len(ds) == 6 and ds[0]["image"].shape == (3, 224, 224)


def test_adapter_names_and_errors(tmp_path):
    assert adapter("DTD-Synthetic").name == "dtd" and adapter("Kvasir-SEG").name == "kvasir"
    with pytest.raises(ValueError, match="known: .*mvtec"):
        adapter("imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert("mvtec", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split_csv.*\n.*Data/Images"):
        convert("visa", tmp_path / "empty")


def test_mvtec_anomaly_without_mask_is_named(tmp_path):
    build_mvtec(tmp_path)
    (tmp_path / "wood/ground_truth/hole/000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="wood/test/hole/000.png"):
        convert("mvtec", tmp_path)


def test_ksdd2_balanced_choice_is_seeded(tmp_path):
    build_ksdd2(tmp_path)
    a = json.loads(convert("ksdd2", tmp_path).read_text())
    b = json.loads(convert("ksdd2", tmp_path).read_text())
    assert a == b


def test_cli_data_convert(tmp_path, capsys):
    from pfl.cli import main

    build_folder(tmp_path)
    assert main(["data", "convert", "folder", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "meta.json")
    assert main(["data", "convert", "visa", "--root", str(tmp_path)]) == 2
    assert "split_csv/1cls.csv is missing" in capsys.readouterr().err


def test_convert_check_opens_images_and_compares_mask_sizes(tmp_path, capsys):
    from pfl.cli import main

    build_mvtec(tmp_path)
    assert main(["data", "convert", "mvtec", "--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "meta.json").unlink()
    img = next(iter(sorted((tmp_path / "wood/test/hole").glob("*.png"))))
    mask = tmp_path / "wood/ground_truth/hole" / f"{img.stem}_mask.png"
    w, h = Image.open(img).size
    Image.new("L", (w + 3, h)).save(mask)
    good = next(iter(sorted((tmp_path / "wood/test/good").glob("*.png"))))
    good.write_bytes(good.read_bytes()[:40])  # truncated
    capsys.readouterr()
    assert main(["data", "convert", "mvtec", "--root", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "2 of 10 samples" in err and "no meta.json written" in err
    assert f"{mask} is {w + 3}x{h} but its image {img} is {w}x{h}" in err
    assert f"cannot read image {good}" in err
    assert not (tmp_path / "meta.json").exists()
    # without --check the index is written (and the dataset names the bad files when read)
    assert main(["data", "convert", "mvtec", "--root", str(tmp_path)]) == 0
