"""pfl.run.predict and the predict/evaluate commands as a user meets them: output names that
cannot collide, all-or-nothing outputs, --skip-bad, the figure (score, colour bar,
uncertainty), and every user error caught before the model loads, with one clear line and
exit code 2."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pfl import cli, config
from pfl.method.contract import Prediction
from pfl.run import checkpoints, evaluate, inputs, predict
from pfl.run.inputs import collect_images
from pfl.run.predict import overlay, predict_images
from pfl.viz.plots import plot_prediction


class Brightness:
    """A method whose map is the pixel brightness (in [0, 1]) and score the map's mean."""

    name = "brightness"
    needs_images = True

    def __init__(self, backbone, fail_after: int | None = None):
        self.backbone = backbone
        self.fail_after = fail_after
        self.calls = 0

    def predict(self, batch, generator):
        from pfl.data.preprocess import denormalize

        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("out of memory (simulated)")
        x = torch.from_numpy(denormalize(batch.images)).mean(-1)  # (N, S, S)
        return Prediction(maps=x, scores=x.mean((1, 2)))


class WithStd(Brightness):
    """Brightness that gives ``map_std`` (here: the map halved) when asked by keyword."""

    def predict(self, batch, generator, map_std: bool = False):
        pred = super().predict(batch, generator)
        pred.map_std = pred.maps / 2 if map_std else None
        return pred


def _write(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((50, 70, 3), 250, np.uint8)).save(d / "bright.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "dark_rgba.png")
    Image.fromarray((np.ones((30, 30)) * 40000).astype(np.uint16)).save(d / "gray16.png")
    (d / "notes.txt").write_text("not an image")
    return d


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_overlays_and_scores(tiny_backbone, tmp_path):
    d = _write(tmp_path)
    table = predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", threshold=0.5,
                           progress=False)
    assert [p.rsplit("/", 1)[1] for p in table["path"]] == ["bright.png", "dark_rgba.png",
                                                             "gray16.png"]
    np.testing.assert_allclose(table["score"], [250 / 255, 0.0, 1.0], atol=0.02)
    assert table["anomalous"].tolist() == ["yes", "no", "yes"]
    assert table["overlay"].tolist() == ["bright_png_overlay.png", "dark_rgba_png_overlay.png",
                                         "gray16_png_overlay.png"]
    back = pd.read_csv(tmp_path / "out" / "scores.csv", keep_default_na=False)
    assert back["anomalous"].tolist() == ["yes", "no", "yes"]
    assert back["skipped"].tolist() == ["", "", ""]
    for name in back["overlay"]:
        assert Image.open(tmp_path / "out" / name).format == "PNG"
    assert _leftovers(tmp_path) == []
    table = predict_images(Brightness(tiny_backbone), [d / "bright.png"], tmp_path / "o2",
                           threshold=None, write_overlays=False, progress=False)
    assert "anomalous" not in table and not list((tmp_path / "o2").glob("*.png"))


def test_output_names_cannot_collide(tiny_backbone, tmp_path):
    """The user's cases: test/good/000.png next to test/contamination/000.png, and
    coffee.jpg next to coffee.png, each got one file and a doubled row in scores.csv."""
    root = tmp_path / "bottle"
    for i, sub in enumerate(("test/good", "test/contamination")):
        (root / sub).mkdir(parents=True)
        Image.new("RGB", (30, 20), (60 * i, 90, 200)).save(root / sub / "000.png")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (30, 20), (10, 10, 10)).save(tmp_path / "photos" / "coffee.jpg")
    Image.new("RGB", (30, 20), (240, 240, 240)).save(tmp_path / "photos" / "coffee.png")
    out = tmp_path / "out"
    # a folder is searched at any depth; the same file given twice is scored once
    table = predict_images(Brightness(tiny_backbone),
                           [root / "test", tmp_path / "photos", root / "test/good/000.png"],
                           out, progress=False)
    assert sorted(table["overlay"]) == [
        "bottle/test/contamination/000_png_overlay.png", "bottle/test/good/000_png_overlay.png",
        "photos/coffee_jpg_overlay.png", "photos/coffee_png_overlay.png"]
    assert table["overlay"].is_unique and len(table) == 4
    for name in table["overlay"]:
        assert (out / name).is_file()
    # one folder: names relative to it
    items = collect_images([root / "test"])
    assert [i.name for i in items] == ["contamination/000_png", "good/000_png"]
    # scores follow their own image (not the neighbour's with the same stem)
    s = dict(zip(table["overlay"], table["score"]))
    assert s["photos/coffee_png_overlay.png"] > 0.9 > 0.1 > s["photos/coffee_jpg_overlay.png"]


def test_outputs_appear_together_or_not_at_all(tiny_backbone, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 20), (50 * i, 0, 0)).save(d / f"{i}.png")
    cfg = config.EvalConfig(batch_size=2)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_images(Brightness(tiny_backbone, fail_after=1), [d], tmp_path / "out", cfg=cfg,
                       progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # an existing non-empty folder is kept as it was on failure, replaced only on --overwrite
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_images(Brightness(tiny_backbone, fail_after=1), [d], tmp_path / "out", cfg=cfg,
                       overwrite=True, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", cfg=cfg, overwrite=True,
                   progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{i}_png_overlay.png" for i in range(5)] + ["scores.csv"]
    assert _leftovers(tmp_path) == []
    # an input folder that holds the output folder does not read old outputs back
    table = predict_images(Brightness(tiny_backbone), [tmp_path], tmp_path / "out", cfg=cfg,
                           overwrite=True, progress=False, write_overlays=False)
    assert len(table) == 5


def test_skip_bad_records_skipped_files(tiny_backbone, tmp_path):
    """The user's case, smaller (17 good images and one unreadable file gave 16 overlays, no
    scores.csv and exit 2): an error naming the file (nothing written), or with skip_bad an
    overlay per good image and the skipped file with its reason in scores.csv."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(d / f"{i:03d}.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"1 of 6 images cannot be read:\n.*broken.png"
                       r"(.|\n)*--skip-bad"):
        predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    table = predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", skip_bad=True,
                           progress=False)
    back = pd.read_csv(tmp_path / "out" / "scores.csv", keep_default_na=False)
    assert len(back) == 6 and len(list((tmp_path / "out").glob("*_overlay.png"))) == 5
    bad = back[back["skipped"] != ""]
    assert bad["path"].str.endswith("broken.png").tolist() == [True]
    assert "cannot read image" in bad["skipped"].iloc[0] and bad["score"].iloc[0] == ""
    assert (table["skipped"] == "").sum() == 5


def test_uncertainty_is_written_beside_the_mean_map(tiny_backbone, tmp_path):
    d = _write(tmp_path)
    table = predict_images(WithStd(tiny_backbone), [d / "bright.png"], tmp_path / "out",
                           uncertainty=True, progress=False)
    maps = np.load(tmp_path / "out" / "bright_png_maps.npz")
    assert maps["mean"].shape == maps["std"].shape == (112, 112)
    np.testing.assert_allclose(maps["std"], 250 / 255 / 2, atol=0.01)
    assert table["std_max"].iloc[0] == pytest.approx(float(maps["std"].max()))
    assert (tmp_path / "out" / "bright_png_overlay.png").is_file()
    # without --uncertainty no std is asked for or written
    table = predict_images(WithStd(tiny_backbone), [d / "bright.png"], tmp_path / "o2",
                           progress=False)
    assert "std_max" not in table and not list((tmp_path / "o2").glob("*.npz"))
    with pytest.raises(ValueError, match=r"brightness gives no per-pixel standard deviation"):
        predict_images(Brightness(tiny_backbone), [d / "bright.png"], tmp_path / "o3",
                       uncertainty=True, progress=False)
    assert not (tmp_path / "o3").exists()


def test_figure_has_score_verdict_and_colour_bars():
    img = Image.new("RGB", (60, 30), (128, 128, 128))
    fig = plot_prediction(img, 0.734, threshold=0.5, title="bottle/000.png")
    title = fig.axes[0].get_title()
    assert "bottle/000.png" in title and "score 0.734" in title and "anomalous" in title
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "abnormal probability"
    lo, hi = fig.axes[1].get_ylim()
    assert (lo, hi) == (0.0, 1.0)  # a fixed scale: images can be compared
    fig = plot_prediction(img, 0.2, threshold=0.5, std_map=np.full((8, 8), 0.1))
    assert "normal" in fig.axes[0].get_title() and len(fig.axes) == 4
    assert "std" in fig.axes[-1].get_ylabel()


def test_overlay_colours_follow_the_map():
    img = Image.new("RGB", (20, 10), (128, 128, 128))
    m = np.zeros((8, 8), np.float32)
    m[:, 4:] = 1.0
    out = np.asarray(overlay(img, m, alpha=1.0))
    assert out.shape == (10, 20, 3)
    assert out[5, 1, 2] > 100 and out[5, 1, 0] < 50  # 0 -> blue in 'jet'
    assert out[5, 18, 0] > 100 and out[5, 18, 2] < 50  # 1 -> red


def test_bad_inputs_name_the_file(tiny_backbone, tmp_path):
    d = _write(tmp_path)
    with pytest.raises(ValueError, match="notes.txt"):
        predict_images(Brightness(tiny_backbone), [d / "notes.txt"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        collect_images([tmp_path / "missing.png"])


def test_a_score_does_not_depend_on_the_image_position(tiny_backbone, tmp_path):
    # Issue #19: the same photo alone, second or fourth in the list (and in batches of
    # another size) gets the same score: its noise comes from the seed and its pixels.
    from pfl.config import EvalConfig, ModelConfig
    from pfl.method.model import BayesPFL

    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a", "b", "c", "coffee"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(d / f"{name}.png")
    model = BayesPFL(tiny_backbone, ModelConfig(flow_length=2, mc_test=2), seed=0).eval()
    coffee = d / "coffee.png"
    runs = {
        "alone": ([coffee], 4),
        "second": ([d / "a.png", coffee, d / "b.png"], 4),
        "fourth": ([d / "a.png", d / "b.png", d / "c.png", coffee], 4),
        "fourth, batches of 2": ([d / "a.png", d / "b.png", d / "c.png", coffee], 2),
    }
    scores = {}
    for k, (files, batch) in runs.items():
        table = predict_images(model, files, tmp_path / k.replace(" ", "_"), threshold=None,
                               cfg=EvalConfig(batch_size=batch), write_overlays=False)
        scores[k] = float(table.set_index("path").loc[str(coffee), "score"])
    assert max(scores.values()) - min(scores.values()) < 1e-5, scores
    # the other images score differently (the test could fail if every score were equal)
    other = predict_images(model, [d / "a.png"], tmp_path / "other", threshold=None,
                           cfg=EvalConfig(batch_size=4), write_overlays=False)
    assert abs(float(other["score"][0]) - scores["alone"]) > 1e-6


# --------------------------------------------------------------------------- the commands


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: every user error must be found before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(predict, "load_run", refuse)
    monkeypatch.setattr(evaluate, "load_run", refuse)


def _fake_run(tmp_path, data_root):
    """A run folder that passes the checks (config.json with a profile, a checkpoint file);
    its weights are never read because the model must not load in these tests."""
    run = tmp_path / "run"
    run.mkdir()
    profile = config.smoke().replace(data={"root": str(data_root), "synthetic": False})
    (run / "config.json").write_text(json.dumps({"method": "Bayes-PFL",
                                                 "profile": profile.to_dict()}))
    (run / checkpoints.CHECKPOINT).write_bytes(b"")
    return run


def _data(tmp_path, name="mine", size=20):
    root = tmp_path / "data" / name
    (root / "a").mkdir(parents=True)
    rows = []
    for i in range(2):
        Image.new("RGB", (size, size)).save(root / "a" / f"{i}.png")
        Image.new("L", (size, size)).save(root / "a" / f"{i}_mask.png")
        rows.append({"img_path": f"a/{i}.png", "mask_path": f"a/{i}_mask.png" if i else "",
                     "cls_name": "a", "anomaly": i})
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"a": rows}}))
    return root


def _fails(argv, capsys, *expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    for text in expected:
        assert text in err, (text, err)
    return err


def test_predict_user_errors_come_before_the_model(tmp_path, capsys, no_model):
    d = _write(tmp_path)
    run = _fake_run(tmp_path, tmp_path / "data")
    ok = ["--images", str(d / "bright.png")]
    _fails(["predict", "--checkpoint", str(tmp_path / "runs/nope"), *ok, "--out",
            str(tmp_path / "o")], capsys, f"checkpoint {tmp_path / 'runs/nope'} does not exist",
           "pfl train --out DIR")
    (tmp_path / "afile").write_text("x")
    _fails(["predict", "--checkpoint", str(run), *ok, "--out", str(tmp_path / "afile")], capsys,
           f"--out {tmp_path / 'afile'} is a file")
    _fails(["predict", "--checkpoint", str(run), "--images", str(d), str(d / "notes.txt"),
            "--out", str(tmp_path / "o")], capsys, "notes.txt", "--skip-bad")
    _fails(["predict", "--checkpoint", str(run), "--images", str(tmp_path / "gone.png"),
            "--out", str(tmp_path / "o")], capsys, "gone.png is neither an image file")
    (run / "config.json").unlink()
    _fails(["predict", "--checkpoint", str(run), *ok, "--out", str(tmp_path / "o")], capsys,
           f"{run / 'config.json'} is missing")
    assert not (tmp_path / "o").exists()


def test_evaluate_user_errors_come_before_the_model(tmp_path, capsys, no_model):
    root = _data(tmp_path)
    run = _fake_run(tmp_path, tmp_path / "data")
    ev = ["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev")]
    _fails(["evaluate", "--checkpoint", str(tmp_path / "runs/nope")], capsys,
           "does not exist")
    _fails([*ev, "--datasets", "other"], capsys, "dataset 'other' is not under the run's data "
           f"root {tmp_path / 'data'}", "['mine']")
    _fails([*ev, "--datasets", str(tmp_path / "nowhere")], capsys, "holds no meta.json")
    # a meta.json with a list where the classes belong
    meta = (root / "meta.json").read_text()
    (root / "meta.json").write_text(json.dumps({"test": [1, 2, 3]}))
    _fails([*ev, "--datasets", "mine"], capsys, str(root / "meta.json"),
           '"test" must map class names to lists of samples')
    (root / "meta.json").write_text(meta)
    # an image deleted after convert, a mask of another size: named, with the fix
    (root / "a" / "0.png").unlink()
    Image.new("L", (7, 7)).save(root / "a" / "1_mask.png")
    err = _fails([*ev, "--datasets", "mine"], capsys, "2 of 2 test samples",
                 f"image file {root / 'a/0.png'} is missing",
                 f"mask {root / 'a/1_mask.png'} is 7x7 but its image", "--check")
    assert "[Errno 2]" not in err
    (tmp_path / "ev_file").write_text("")
    _fails(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev_file")], capsys,
           "is a file")


def test_evaluate_datasets_take_names_or_paths(tmp_path, monkeypatch):
    _data(tmp_path, "mine")
    elsewhere = _data(tmp_path / "x", "mvtec")
    profile = config.smoke().replace(data={"root": str(tmp_path / "data"), "synthetic": False})
    found = evaluate.resolve_datasets(profile, ["mine", str(elsewhere)])
    assert found == {"mine": tmp_path / "data" / "mine", "mvtec": elsewhere}
    monkeypatch.chdir(tmp_path / "x")
    assert evaluate.resolve_datasets(profile, ["data/mvtec"]) == {"mvtec": elsewhere}
    # a bare name that is only a folder here, not under the data root
    monkeypatch.chdir(tmp_path / "x" / "data")
    assert evaluate.resolve_datasets(profile, ["mvtec"]) == {"mvtec": elsewhere}
    with pytest.raises(ValueError, match="two datasets are named 'mine'"):
        evaluate.resolve_datasets(profile, ["mine", str(_data(tmp_path / "y", "mine"))])


def test_run_file_names_agree():
    assert (inputs.CHECKPOINT, inputs.CONFIG) == (checkpoints.CHECKPOINT, checkpoints.CONFIG)


def test_input_checks_need_no_torch():
    """The checks run before torch loads (its import alone took 7-20 s on a busy machine)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from pfl.run.inputs import check_inputs, check_run; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_version_and_help_are_for_users(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "pfl 0.1.0"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "anomaly" in text and "pfl predict" in text and "argparse" not in text
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = capsys.readouterr().out
    for flag in ("--skip-bad", "--uncertainty", "--threshold", "--overwrite"):
        assert flag in text


# --------------------------------------------------------------------------- order independence


def _bayes_scores(backbone, files, tmp_path, tag, batch_size):
    from pfl.method.model import BayesPFL

    model = BayesPFL(backbone, config.ModelConfig(mc_test=2), seed=0)
    table = predict_images(model, files, tmp_path / tag, threshold=None, progress=False,
                           cfg=config.EvalConfig(batch_size=batch_size))
    # the score, the map's maximum, and the overlay's pixels (the whole smoothed map, drawn)
    return {row.path: (row.score, row.map_max,
                       np.asarray(Image.open(tmp_path / tag / row.overlay), np.float64))
            for row in table.itertuples()}


def _same(a, b):
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-5, atol=1e-6)
    assert np.abs(a[2] - b[2]).max() <= 1  # PNG pixels: one grey level of rounding


@pytest.fixture()
def five_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return sorted(d.iterdir())


@pytest.mark.slow
def test_scores_do_not_depend_on_batch_size(tiny_backbone, five_images, tmp_path):
    a = _bayes_scores(tiny_backbone, five_images, tmp_path, "b1", batch_size=1)
    b = _bayes_scores(tiny_backbone, five_images, tmp_path, "b4", batch_size=4)
    assert a.keys() == b.keys()
    for k in a:
        _same(a[k], b[k])


@pytest.mark.slow
def test_scores_do_not_depend_on_order_or_neighbours(tiny_backbone, five_images, tmp_path):
    a = _bayes_scores(tiny_backbone, five_images, tmp_path, "fwd", batch_size=2)
    b = _bayes_scores(tiny_backbone, five_images[::-1], tmp_path, "rev", batch_size=3)
    c = _bayes_scores(tiny_backbone, five_images[3:4], tmp_path, "one", batch_size=1)
    for k in a:
        _same(a[k], b[k])
    k = str(five_images[3])
    _same(a[k], c[k])
