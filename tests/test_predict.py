"""pfl.run.predict: the user's own images -> overlays at their own size + scores.csv with a
threshold; odd image modes are read; bad input names the file."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pfl.method.contract import Prediction
from pfl.run.predict import collect_images, overlay, predict_images


class Brightness:
    """A method whose map is the pixel brightness (in [0, 1]) and score the map's mean."""

    name = "brightness"
    needs_images = True

    def __init__(self, backbone):
        self.backbone = backbone

    def predict(self, batch, generator):
        from pfl.data.preprocess import denormalize

        x = torch.from_numpy(denormalize(batch.images)).mean(-1)  # (N, S, S)
        return Prediction(maps=x, scores=x.mean((1, 2)))


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


def test_overlays_and_scores(tiny_backbone, tmp_path):
    d = _write(tmp_path)
    table = predict_images(Brightness(tiny_backbone), [d], tmp_path / "out", threshold=0.5)
    assert [p.rsplit("/", 1)[1] for p in table["path"]] == ["bright.png", "dark_rgba.png",
                                                             "gray16.png"]
    np.testing.assert_allclose(table["score"], [250 / 255, 0.0, 1.0], atol=0.02)
    assert table["anomalous"].tolist() == ["yes", "no", "yes"]
    assert Image.open(tmp_path / "out" / "bright_overlay.png").size == (70, 50)
    back = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert back["anomalous"].tolist() == ["yes", "no", "yes"]
    table = predict_images(Brightness(tiny_backbone), [d / "bright.png"], tmp_path / "o2",
                           threshold=None, write_overlays=False)
    assert "anomalous" not in table and not list((tmp_path / "o2").glob("*.png"))


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
