"""pfl.run.evaluate: the blur, the image-score recipes, the metrics path, tables and figures."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from _toy import SIZE, ToyMethod, toy_store
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from pfl.clip.backbone import ImageFeatures
from pfl.config import EvalConfig
from pfl.method.contract import Prediction
from pfl.run.evaluate import (
    evaluate,
    evaluate_all,
    image_auroc_by_category,
    image_scores,
    linear_probe_auroc,
    official_minmax_scores,
    predict_store,
    scaled_sigma,
    scaled_topk,
    smooth_maps,
    topk_mean,
)
from pfl.run.metrics import evaluate_records


class Oracle(ToyMethod):
    """Predicts the ground truth: mask as the map, label as the score (plus a tie-breaker)."""

    name = "oracle"

    def predict(self, batch, generator):
        noise = 1e-3 * torch.rand(batch.masks.shape, generator=generator)
        return Prediction(maps=batch.masks + noise, scores=batch.labels.float())


def test_blur_is_a_normalised_gaussian_scaled_to_the_size():
    assert scaled_sigma(8, 518) == 8 and scaled_sigma(8, 259) == 4
    impulse = np.zeros((2, 65, 65), np.float32)
    impulse[:, 32, 32] = 1
    out = smooth_maps(torch.from_numpy(impulse), 3.0)
    x = np.arange(65) - 32
    g = norm.pdf(x, scale=3.0) * (np.abs(x) <= 12)  # scipy truncates at 4 sigma
    np.testing.assert_allclose(out[0], np.outer(g, g) / g.sum() ** 2, atol=1e-7)
    np.testing.assert_allclose(out.sum((1, 2)), 1.0, rtol=1e-5)
    assert np.array_equal(smooth_maps(impulse, 0.0), impulse)


def test_topk_and_official_minmax_against_brute_force():
    rng = np.random.default_rng(0)
    maps = rng.random((9, 6, 6)).astype(np.float32)
    scores = rng.random(9)
    names = ["a", "b", "c"] * 3
    k = 5
    brute_top = np.array([np.sort(m.ravel())[-k:].mean() for m in maps])
    np.testing.assert_allclose(topk_mean(maps, k), brute_top, rtol=1e-6)
    got = official_minmax_scores(scores, maps, names, k)
    for c in "abc":
        rows = [i for i, n in enumerate(names) if n == c]
        s, t = scores[rows], brute_top[rows]
        want = 0.5 * (s - s.min()) / (s.max() - s.min()) + 0.5 * (t - t.min()) / (t.max() - t.min())
        np.testing.assert_allclose(got[rows], want, rtol=1e-6)
    assert scaled_topk(2000, 518) == 2000 and scaled_topk(2000, 224) == 374


def test_evaluate_equals_metrics_on_the_smoothed_maps():
    store = toy_store(["a", "b", "c"], n_per_class=6, seed=4)
    m = ToyMethod()
    with torch.no_grad():
        m.heads.copy_(torch.ones_like(m.heads))
    cfg = EvalConfig(batch_size=5, sigma=8.0 * 518 / 518)
    res = evaluate(m, store, cfg, keep_predictions=True)
    with torch.no_grad():
        raw = torch.cat([m.predict(b, None).maps for b in store.batches(7)])
    smoothed = smooth_maps(raw, scaled_sigma(8.0, SIZE))
    np.testing.assert_allclose(res.predictions.maps, smoothed, atol=1e-6)
    ref = evaluate_records(
        [{"cls_name": c, "score": float(s), "label": int(y), "anomaly_map": a, "mask": k}
         for c, s, y, a, k in zip(store.cls_names, res.samples["method_score"],
                                  store.labels, smoothed, store.masks.numpy())])
    np.testing.assert_allclose(res.table.to_numpy(float), ref.to_numpy(float), atol=1e-9)
    assert list(res.table.index) == ["a", "b", "c", "mean"]
    # The official recipe changes the image score only.
    off = evaluate(m, store, EvalConfig(batch_size=5, image_score="official_minmax"))
    np.testing.assert_allclose(off.table["pixel_ap"], res.table["pixel_ap"])
    pred = predict_store(m, store, cfg)
    np.testing.assert_allclose(
        off.samples["score"],
        official_minmax_scores(pred.scores, pred.maps, pred.cls_names, scaled_topk(2000, SIZE)))
    with pytest.raises(ValueError, match="image_score"):
        image_scores(pred, EvalConfig(image_score="nope"))


def test_oracle_scores_one_and_tables_and_figures_are_written(tmp_path):
    from pfl.run.results import Table

    class Images:  # what the qualitative figure reads back
        def __getitem__(self, i):
            return {"image": torch.zeros(3, SIZE, SIZE)}

    store = toy_store(["a", "b"], n_per_class=4, dataset=Images())
    results, evals = evaluate_all(Oracle(), {"tgt": store}, EvalConfig(sigma=0.0),
                                  out_dir=tmp_path, method_name="Oracle")
    mean = evals["tgt"].table.loc["mean"]
    assert mean["image_auroc"] == 1.0 and mean["pixel_auroc"] == 1.0 and mean["pixel_pro"] == 1.0
    table = Table.from_csv(tmp_path / "tables" / "tgt_tableA4.csv")
    assert list(table.values.columns) == ["Oracle"] and table.values.loc["mean", "Oracle"] == 1.0
    assert (tmp_path / "tables" / "tgt.md").read_text().count("100.0") >= 3
    for c in ("a", "b"):
        assert (tmp_path / "figures" / f"tgt_{c}.png").is_file()
        assert (tmp_path / "figures" / f"tgt_{c}.csv").is_file()
    assert len((tmp_path / "samples" / "tgt.csv").read_text().splitlines()) == 1 + len(store)


def test_bad_map_shape_is_a_clear_error():
    class Wrong(ToyMethod):
        def predict(self, batch, generator):
            return Prediction(maps=torch.zeros(len(batch), 3, 3), scores=torch.zeros(len(batch)))

    with pytest.raises(ValueError, match=r"maps must be \(N, S, S\)"):
        evaluate(Wrong(), toy_store(["a"], 2))


class _Sampling(ToyMethod):
    """ToyMethod that records the R it uses (``predict(..., n_samples)`` as BayesPFL has)."""

    takes_n_samples = True

    def __init__(self):
        super().__init__()
        self.r, self.seen = 5, []

    def predict(self, batch, generator, n_samples=None):
        self.seen.append(n_samples or self.r)
        return super().predict(batch, generator)


def test_mc_samples_reaches_methods_that_sample_and_only_for_the_evaluation():
    store = toy_store(["a", "b"], 4, seed=3)
    method = _Sampling()
    evaluate(method, store, EvalConfig(batch_size=4))  # None: the method's own R
    assert set(method.seen) == {5}
    method.seen.clear()
    evaluate(method, store, EvalConfig(batch_size=4, mc_samples=2))
    assert set(method.seen) == {2} and method.r == 5
    # a method that draws nothing has no R: the setting is ignored, the maps are the same
    plain = evaluate(ToyMethod(), store, EvalConfig(batch_size=4, mc_samples=2)).table
    own = evaluate(ToyMethod(), store, EvalConfig(batch_size=4)).table
    pd.testing.assert_frame_equal(plain, own)


def test_image_auroc_by_category_equals_sklearn_per_category():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=40), np.tile([0, 1], 20)
    names = ["a"] * 20 + ["b"] * 20
    got = image_auroc_by_category(scores, labels, names)
    want = [roc_auc_score(labels[:20], scores[:20]), roc_auc_score(labels[20:], scores[20:])]
    np.testing.assert_allclose(got[["a", "b"]], want, atol=1e-12)
    assert got["mean"] == pytest.approx(np.mean(want))


def test_linear_probe_transfers_a_shared_direction_and_not_noise():
    # toy stores: anomalous images carry a shift along one direction shared by all categories,
    # in the global feature and in their patch tokens. A probe fitted on three categories
    # transfers to two unseen ones; with the global feature replaced by noise it cannot.
    train, test = toy_store(["a", "b", "c"], 20, seed=1), toy_store(["d", "e"], 20, seed=2)
    assert linear_probe_auroc(train, test, feature="patch_mean")["mean"] > 0.9
    assert linear_probe_auroc(train, test, feature="global")["mean"] > 0.9

    def noise_global(store, seed):
        g = torch.randn(store.feats.global_.shape, generator=torch.Generator().manual_seed(seed))
        return dataclasses.replace(store, feats=ImageFeatures(g, store.feats.patches))

    blind = linear_probe_auroc(noise_global(train, 5), noise_global(test, 6), feature="global")
    assert abs(blind["mean"] - 0.5) < 0.2
    with pytest.raises(ValueError, match="'global' or 'patch_mean'"):
        linear_probe_auroc(train, test, feature="cls")


def test_figure_csv_paths_are_relative_to_the_dataset_root(tmp_path):
    from types import SimpleNamespace

    from pfl.run.evaluate import _relative_to_root

    inner = SimpleNamespace(root=tmp_path / "data")
    wrapped = SimpleNamespace(root=None, dataset=inner)  # e.g. a subset of the dataset
    inside = str(tmp_path / "data" / "target" / "cat" / "000.png")
    assert _relative_to_root(inside, inner) == "target/cat/000.png"
    assert _relative_to_root(inside, wrapped) == "target/cat/000.png"
    outside = str(tmp_path / "elsewhere.png")
    assert _relative_to_root(outside, inner) == outside
    assert _relative_to_root(inside, None) == inside


# --------------------------------------------------------------------------- uncertainty


@pytest.fixture(scope="module")
def tiny_bayes():
    """An untrained Bayes-PFL on the tiny tower (56 px) and a store of 6 noisy images."""
    from pfl.clip.backbone import Backbone
    from pfl.config import BackboneConfig, ModelConfig
    from pfl.data.preprocess import image_to_tensor
    from pfl.method.model import BayesPFL
    from pfl.run.features import encode_dataset

    size = 56
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        mask = np.zeros((size, size), np.float32)
        img = (rng.random((size, size, 3)) * 120 + 60).astype(np.uint8)
        if i % 2:
            img[10:24, 20:34] = 250
            mask[10:24, 20:34] = 1
        items.append({"image": image_to_tensor(img, size), "mask": torch.from_numpy(mask),
                      "label": i % 2, "cls_name": "ab"[i // 3], "path": f"/x/{i}.png"})
    backbone = Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=size))
    store = encode_dataset(backbone, items, progress=False)
    return BayesPFL(backbone, ModelConfig(flow_length=2, mc_test=3), seed=0).eval(), store


def test_uncertainty_columns_are_the_std_of_the_same_r_samples(tiny_bayes):
    model, store = tiny_bayes
    cfg = EvalConfig(batch_size=4, seed=7, mc_samples=4)
    plain = evaluate(model, store, cfg)
    res = evaluate(model, store, dataclasses.replace(cfg, uncertainty=True))
    assert "std_mean" not in plain.samples
    assert list(res.samples.columns) == list(plain.samples.columns) + ["std_mean", "std_max"]
    # nothing else moves: the std comes from the same predict call as the map
    pd.testing.assert_frame_equal(res.samples[plain.samples.columns], plain.samples)
    pd.testing.assert_frame_equal(res.table, plain.table)
    # a fresh predict(..., map_std=True) with the evaluation's seed and R, all images at once
    batch = next(store.batches(len(store)))
    with torch.no_grad():
        std = model.predict(batch, torch.Generator().manual_seed(7), n_samples=4,
                            map_std=True).map_std.double().numpy().reshape(len(store), -1)
    np.testing.assert_allclose(res.samples["std_mean"], std.mean(1), rtol=1e-6, atol=0)
    np.testing.assert_allclose(res.samples["std_max"], std.max(1), rtol=1e-6, atol=0)
    assert (res.samples["std_max"] > res.samples["std_mean"]).all()
    assert (res.samples["std_mean"] > 0).all()  # the R draws disagree
    # R is the slider of the std too: one sample has no spread
    one = evaluate(model, store, EvalConfig(batch_size=4, mc_samples=1, uncertainty=True))
    assert (one.samples["std_max"] == 0).all()


def test_uncertainty_reaches_samples_csv_and_a_peer_is_a_clear_error(tiny_bayes, tmp_path):
    model, store = tiny_bayes
    cfg = EvalConfig(batch_size=4, uncertainty=True)
    _, evals = evaluate_all(model, {"tgt": store}, cfg, out_dir=tmp_path, figures=False)
    back = pd.read_csv(tmp_path / "samples" / "tgt.csv")
    np.testing.assert_allclose(back["std_max"], evals["tgt"].samples["std_max"], rtol=1e-12)
    assert back["std_mean"].notna().all()
    # the peers draw no samples: the method is named, with the fix
    with pytest.raises(ValueError, match=r"toy gives no per-pixel standard deviation.*"
                       r"without --uncertainty \(EvalConfig\(uncertainty=False\)\)"):
        evaluate(ToyMethod(), toy_store(["a"], 2), cfg)

    class Silent(ToyMethod):  # takes map_std but gives none
        name = "silent"

        def predict(self, batch, generator, map_std=False):
            return super().predict(batch, generator)

    with pytest.raises(ValueError, match="silent gives no per-pixel standard deviation"):
        evaluate(Silent(), toy_store(["a"], 2), cfg)


def test_cli_evaluate_uncertainty_reaches_the_evaluation_config(monkeypatch, capsys):
    from pfl import cli
    from pfl.run import evaluate as ev
    from pfl.run import inputs

    seen = []

    def fake_run(checkpoint, out, **kw):
        seen.append(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(inputs, "check_run", lambda checkpoint: {})
    monkeypatch.setattr(ev, "evaluate_run", fake_run)
    assert cli.main(["evaluate", "--checkpoint", "run", "--uncertainty"]) == 2
    assert cli.main(["evaluate", "--checkpoint", "run"]) == 2
    # absent: None, so a run's own EvalConfig.uncertainty is kept (evaluate_run ignores None)
    assert [kw["uncertainty"] for kw in seen] == [True, None]
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    assert "--uncertainty" in capsys.readouterr().out
