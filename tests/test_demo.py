"""The main job and the train/evaluate/predict commands, end to end on a miniature profile
(56 px tiny tower, 2 + 2 images per category and split, one short epoch) from a fresh folder."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pfl import cli, config

pytestmark = pytest.mark.slow


@pytest.fixture()
def mini(tmp_path, monkeypatch):
    profile = config.smoke().replace(
        backbone={"image_size": 56},
        model={"mc_test": 2},
        train={"epochs": 1, "batch_size": 8},
        eval={"batch_size": 16},
        data={"root": str(tmp_path / "data"), "synth_images": 2, "feature_cache": "memory"},
    )
    monkeypatch.setattr(config, "active", lambda name=None: profile)
    return profile


def test_demo_runs_from_nothing(mini, tmp_path, capsys):
    from pfl.run.demo import run

    out = run(tmp_path / "demo", profile=mini, progress=False)
    printed = capsys.readouterr().out
    assert "written:" in printed and str(tmp_path / "demo") in printed
    summary = out["summary"]
    assert list(summary.index) == [("Bayes-PFL (untrained)", "target"),
                                   ("Bayes-PFL (untrained)", "medical"),
                                   ("Bayes-PFL", "target"), ("Bayes-PFL", "medical")]
    for rel in ("summary.md", "results.csv", "tables/target_tableA4.md",
                "tables/medical_Bayes-PFL.md", "figures/loss_terms.png", "figures/target_cat.png",
                "run/checkpoint.safetensors", "run/config.json", "run/epochs.csv"):
        assert (tmp_path / "demo" / rel).is_file(), rel
    assert "trained 1 epochs" in printed
    # a second demo reuses the finished checkpoint, and says so (it said "trained 1 epochs")
    run(tmp_path / "demo", profile=mini, progress=False, compare_untrained=False)
    printed = capsys.readouterr().out
    assert "reused the finished checkpoint (1 epochs" in printed and "trained 1" not in printed


def test_cli_train_evaluate_predict(mini, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"] == "Bayes-PFL"
    assert saved["profile"]["backbone"]["image_size"] == 56
    assert cli.main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev"),
                     "--datasets", "medical", "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "ev" / "tables" / "medical.csv", index_col=0)
    assert list(table.index) == ["cell", "phantom", "retina", "tissue", "mean"]
    # the evaluation settings can be changed per call: R = 1 instead of the run's 10 moves
    # the maps, so the pixel metrics change
    assert cli.main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev1"),
                     "--datasets", "medical", "--mc-samples", "1", "--image-score",
                     "official_minmax", "--no-progress"]) == 0
    one = pd.read_csv(tmp_path / "ev1" / "tables" / "medical.csv", index_col=0)
    assert not np.allclose(one["pixel_ap"], table["pixel_ap"])
    imgs = tmp_path / "mine"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (80 + i, 60), (40 * i, 90, 200)).save(imgs / f"p{i}.png")
    assert cli.main(["predict", "--checkpoint", str(run), "--images", str(imgs), "--out",
                     str(tmp_path / "pred"), "--threshold", "0.3",
                     "--class-name", "bottle"]) == 0
    scores = pd.read_csv(tmp_path / "pred" / "scores.csv")
    assert len(scores) == 3 and set(scores["anomalous"]) <= {"yes", "no"}
    assert (scores["anomalous"] == "yes").tolist() == (scores["score"] >= 0.3).tolist()
    assert scores["overlay"].tolist() == [f"p{i}_png_overlay.png" for i in range(3)]
    assert "3 images" in capsys.readouterr().out
    # the same run with --uncertainty: Bayes-PFL's std over its R samples, or a clear error
    # when the method gives none (before the map_std of the method lands)
    code = cli.main(["predict", "--checkpoint", str(run), "--images", str(imgs), "--out",
                     str(tmp_path / "unc"), "--uncertainty", "--no-progress"])
    if code == 0:
        maps = np.load(tmp_path / "unc" / "p0_png_maps.npz")
        assert maps["std"].shape == maps["mean"].shape and (maps["std"] >= 0).all()
    else:
        assert code == 2 and "gives no per-pixel standard deviation" in capsys.readouterr().err
        assert not (tmp_path / "unc").exists()
    # evaluate takes a dataset folder by path too
    assert cli.main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev2"),
                     "--datasets", str(mini.data.root) + "/medical", "--no-progress"]) == 0
    again = pd.read_csv(tmp_path / "ev2" / "tables" / "medical.csv", index_col=0)
    pd.testing.assert_frame_equal(again, table)
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "nope"), "--images",
                     str(imgs), "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
