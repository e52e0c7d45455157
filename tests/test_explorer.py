"""The ipywidgets explorer, driven without a browser: set a control, read the numbers."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pfl.baselines import AprilGAN
from pfl.clip.backbone import Backbone
from pfl.config import BackboneConfig, EvalConfig, ModelConfig
from pfl.data.preprocess import image_to_tensor
from pfl.method.model import BayesPFL
from pfl.run.evaluate import scaled_sigma, smooth_maps
from pfl.run.features import encode_dataset
from pfl.viz.explorer import Explorer, per_image_metrics

SIZE = 56


class FakeDataset:
    """Images with a bright square defect on the anomalous ones, as AnomalyDataset gives them."""

    def __init__(self, classes, n_per_label=2, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for c in classes:
            for y in (0, 1):
                for k in range(n_per_label):
                    img = (rng.random((SIZE, SIZE, 3)) * 80 + 60).astype(np.uint8)
                    mask = np.zeros((SIZE, SIZE), np.float32)
                    if y:
                        r, q = rng.integers(4, SIZE - 20, 2)
                        img[r:r + 14, q:q + 14] = 250
                        mask[r:r + 14, q:q + 14] = 1
                    self.items.append({"image": image_to_tensor(img, SIZE),
                                       "mask": torch.from_numpy(mask), "label": y,
                                       "cls_name": c, "path": f"/x/{c}/{y}_{k}.png"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def setup():
    backbone = Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=SIZE))
    stores = {name: encode_dataset(backbone, FakeDataset(classes, seed=s), progress=False)
              for name, classes, s in (("one", ("a", "b"), 0), ("two", ("c",), 1))}
    bayes = BayesPFL(backbone, ModelConfig(flow_length=2, mc_test=3), seed=0).eval()
    peer = AprilGAN(backbone, generator=torch.Generator().manual_seed(0)).eval()
    return backbone, stores, bayes, peer


@pytest.fixture
def explorer(setup):
    _, stores, bayes, peer = setup
    return Explorer({"Bayes-PFL": bayes, "APRIL-GAN": peer}, stores,
                    eval_cfg=EvalConfig(seed=3), r_max=6)


def test_per_image_metrics_match_sklearn_and_counts():
    rng = np.random.default_rng(0)
    m = rng.random((20, 20))
    k = np.zeros((20, 20), np.uint8)
    k[5:9, 3:12] = 1
    m[k == 1] += 0.3
    r = per_image_metrics(m, k, score=0.4, label=1, threshold=0.7)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(k.ravel(), m.ravel()), abs=1e-12)
    assert r["pixel_ap"] == pytest.approx(average_precision_score(k.ravel(), m.ravel()), abs=1e-12)
    pred, gt = m >= 0.7, k == 1
    tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
    assert r["pixel_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert r["flagged"] == pytest.approx(pred.mean())
    assert (r["decision"], r["correct"]) == (0, 0)
    normal = per_image_metrics(m, np.zeros_like(k), score=0.1, label=0, threshold=0.7)
    assert math.isnan(normal["pixel_auroc"]) and math.isnan(normal["recall"])
    assert normal["correct"] == 1


def _reference(ex: Explorer, method, r: int | None):
    """The numbers recomputed from scratch for the explorer's current controls."""
    store, row = ex.store, ex.image.value
    batch = next(store.select([row]).batches(1))
    seed = ex.eval_cfg.seed + row
    with torch.no_grad():
        if r is not None:
            out = method.forward_features(batch.feats, batch.cls_names, seed=ex.eval_cfg.seed,
                                          n_samples=r)
            amap, score = out.anomaly_map[0], float(out.score[0])
        else:
            pred = method.predict(batch, torch.Generator().manual_seed(seed))
            amap, score = pred.maps[0], float(pred.scores[0])
    smooth = smooth_maps(amap[None], scaled_sigma(ex.sigma.value, store.image_size))[0]
    return per_image_metrics(smooth, store.masks[row].numpy(), score, int(store.labels[row]),
                             ex.threshold.value)


def _same(a: dict, b: dict):
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_sliders_update_the_numbers_as_a_fresh_computation_does(explorer, setup):
    bayes = setup[2]
    assert explorer.image.value == explorer.image.options[0][1]
    assert int(explorer.store.labels[explorer.image.value]) == 1  # anomalous images first
    _same(explorer.numbers, _reference(explorer, bayes, 3))

    before = dict(explorer.numbers)
    explorer.sigma.value = 0.0
    assert explorer.numbers["pixel_auroc"] != before["pixel_auroc"]
    _same(explorer.numbers, _reference(explorer, bayes, 3))

    explorer.mc.value = 1
    assert explorer.numbers["image_score"] != before["image_score"]
    _same(explorer.numbers, _reference(explorer, bayes, 1))

    png = explorer.view.value
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    t = float(np.round(np.median(explorer.smoothed), 3))
    assert t != explorer.threshold.value  # a new threshold (an untrained model's map is ~0.5)
    explorer.threshold.value = t
    assert explorer.numbers["flagged"] == pytest.approx((explorer.smoothed >= t).mean())
    _same(explorer.numbers, _reference(explorer, bayes, 1))
    assert explorer.view.value != png
    assert "image score" in explorer.summary.value


def test_method_toggle_uses_the_peer_and_disables_r(explorer, setup):
    peer = setup[3]
    explorer.method.value = "APRIL-GAN"
    assert explorer.mc.disabled
    _same(explorer.numbers, _reference(explorer, peer, None))
    explorer.method.value = "Bayes-PFL"
    assert not explorer.mc.disabled


def test_dataset_and_category_choices_follow_each_other(explorer, setup):
    stores = setup[1]
    explorer.dataset.value = "two"
    assert list(explorer.category.options) == ["c"]
    rows = [v for _, v in explorer.image.options]
    assert sorted(rows) == [i for i, c in enumerate(stores["two"].cls_names) if c == "c"]
    assert explorer.numbers["label"] == int(stores["two"].labels[explorer.image.value])
    explorer.dataset.value = "one"
    explorer.category.value = "b"
    assert all(stores["one"].cls_names[v] == "b" for _, v in explorer.image.options)
    explorer.image.value = explorer.image.options[-1][1]  # a normal image
    assert explorer.numbers["label"] == 0 and math.isnan(explorer.numbers["pixel_auroc"])


def test_bad_inputs_and_the_viz_entry_point(setup):

    _, stores, bayes, _ = setup
    store = stores["one"]
    bare = store.select(range(len(store)))
    bare.dataset = None
    with pytest.raises(ValueError, match="no dataset"):
        Explorer({"Bayes-PFL": bayes}, {"x": bare})
    with pytest.raises(ValueError, match="at least one method"):
        Explorer({}, stores)


def _fresh_std(ex: Explorer, method, r: int) -> np.ndarray:
    """A fresh ``predict(..., map_std=True)``'s std map: the explorer's seed, the slider's R."""
    batch = next(ex.store.select([ex.image.value]).batches(1))
    with torch.no_grad():
        pred = method.predict(batch, torch.Generator().manual_seed(ex.eval_cfg.seed),
                              n_samples=r, map_std=True)
    return pred.map_std[0].double().numpy()


def _width(png: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size[0]


def test_uncertainty_toggle_adds_the_std_panel_and_numbers(explorer, setup):
    bayes = setup[2]
    assert not explorer.uncertainty.value and not explorer.uncertainty.disabled
    assert "std_mean" not in explorer.numbers and explorer.std is None
    png, before, n_cached = explorer.view.value, dict(explorer.numbers), len(explorer._cache)

    explorer.uncertainty.value = True
    std = _fresh_std(explorer, bayes, 3)
    assert explorer.numbers["std_mean"] == pytest.approx(std.mean(), rel=1e-6)
    assert explorer.numbers["std_max"] == pytest.approx(std.max(), rel=1e-6)
    assert explorer.numbers["std_max"] > explorer.numbers["std_mean"] > 0
    _same(before, explorer.numbers)  # the map's numbers do not move
    assert _width(explorer.view.value) > _width(png)  # a fourth panel
    assert "std over R samples" in explorer.summary.value
    assert len(explorer._cache) == n_cached  # same keys; the std is stored beside the map

    explorer.mc.value = 5  # the std follows the R slider
    std5 = _fresh_std(explorer, bayes, 5)
    assert explorer.numbers["std_mean"] == pytest.approx(std5.mean(), rel=1e-6)
    assert explorer.numbers["std_mean"] != pytest.approx(std.mean(), rel=1e-6)
    _same({k: v for k, v in explorer.numbers.items() if not k.startswith("std")},
          _reference(explorer, bayes, 5))
    explorer.mc.value = 3

    explorer.uncertainty.value = False
    assert explorer.view.value == png  # the previous rendering, byte for byte
    assert "std_mean" not in explorer.numbers and explorer.std is None
    _same(explorer.numbers, before)


def test_uncertainty_is_disabled_for_a_peer(explorer):
    explorer.uncertainty.value = True
    assert "std_mean" in explorer.numbers
    explorer.method.value = "APRIL-GAN"
    assert explorer.uncertainty.disabled and explorer.mc.disabled
    assert "std_mean" not in explorer.numbers and explorer.std is None
    peer_png = explorer.view.value
    explorer.uncertainty.value = False  # no effect while disabled
    assert explorer.view.value == peer_png
    explorer.uncertainty.value = True
    explorer.method.value = "Bayes-PFL"
    assert not explorer.uncertainty.disabled and "std_max" in explorer.numbers
    with pytest.raises(ValueError, match="APRIL-GAN gives no per-pixel standard deviation"):
        explorer.raw_std("APRIL-GAN", explorer.dataset.value, explorer.image.value, 3)
