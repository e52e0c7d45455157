"""Ablation sweeps, Table A.2 runs and the Figure A.4 t-SNE helpers (pfl.viz.ablations)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.config import BackboneConfig, EvalConfig, ModelConfig, TrainConfig
from pfl.method.model import BayesPFL
from pfl.method.sampling import feature_keys, image_seeds
from pfl.run.features import FeatureStore, subsample_dataset
from pfl.run.metrics import METRICS
from pfl.viz import ablations

SIZE = 56  # 4 x 4 patches of 14 px: the smallest tower that runs


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=SIZE))


def random_store(backbone: Backbone, n_per_class: int = 2, classes=("a", "b"), seed: int = 0
                 ) -> FeatureStore:
    """Random frozen-tower features with square defects on half of the images."""
    g = torch.Generator().manual_seed(seed)
    names, labels = [], []
    for c in classes:
        for y in (0, 1):
            names += [c] * n_per_class
            labels += [y] * n_per_class
    n = len(names)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
    for i, y in enumerate(labels):
        if y:
            r, c = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
            masks[i, r:r + 12, c:c + 12] = 1
    gh, gw = backbone.grid
    feats = ImageFeatures(torch.randn(n, backbone.embed_dim, generator=g),
                          torch.randn(n, len(backbone.layers), gh * gw, backbone.vision_width,
                                      generator=g))
    return FeatureStore(feats, masks=masks, labels=torch.tensor(labels), cls_names=names,
                        paths=[f"{c}/{i}.png" for i, c in enumerate(names)])


TRAIN = TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_steps_per_epoch=2)
EVAL = EvalConfig(batch_size=8)
SMALL = ModelConfig(flow_length=2, mc_test=2)


def test_one_at_a_time_changes_one_field_and_names_bad_fields():
    base = ModelConfig()
    runs = ablations.one_at_a_time(base, {"n_prompts": [1, 5], "n_ctx": [2]})
    assert [(p, v) for p, v, _ in runs] == [("n_prompts", 1), ("n_prompts", 5), ("n_ctx", 2)]
    for p, v, cfg in runs:
        diff = {k for k, x in dataclasses.asdict(cfg).items() if x != getattr(base, k)}
        assert diff == {p} and getattr(cfg, p) == v
    with pytest.raises(ValueError, match="n_bank"):
        ablations.one_at_a_time(base, {"n_bank": [1]})


def test_sweep_trains_the_shared_base_once_per_seed_and_keeps_every_row():
    calls = []

    def runner(backbone, cfg, train, target, train_cfg, eval_cfg, seed):
        calls.append((cfg.n_prompts, cfg.flow_length, seed))
        return {"pixel_pro": cfg.n_prompts + 10 * cfg.flow_length + 100 * seed, "image_ap": 0.5}

    base = ModelConfig(n_prompts=3, flow_length=10)
    grid = {"n_prompts": (1, 3), "flow_length": (5, 10)}
    frame = ablations.sweep(None, base, grid, None, None, TRAIN, EVAL, seeds=(0, 1),
                            runner=runner)
    assert len(frame) == 2 * 2 * 2
    # (3, 10) is the base: it appears in both sweeps but runs once per seed.
    assert sorted(calls) == sorted({(1, 10, 0), (1, 10, 1), (3, 10, 0), (3, 10, 1),
                                    (3, 5, 0), (3, 5, 1)})
    row = frame[(frame.param == "flow_length") & (frame.value == 5) & (frame.seed == 1)]
    assert row["pixel_pro"].item() == 3 + 50 + 100 and row["symbol"].item() == "K"


def test_summarise_matches_numpy_mean_and_sample_std():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"param": ["n_ctx"] * 6, "symbol": ["P"] * 6,
                          "value": [1, 1, 1, 3, 3, 3], "pixel_pro": rng.random(6),
                          "image_ap": rng.random(6)})
    s = ablations.summarise(frame)
    for v in (1, 3):
        x = frame.loc[frame.value == v, "pixel_pro"].to_numpy()
        row = s[s.value == v]
        assert row["pixel_pro_mean"].item() == pytest.approx(x.mean(), abs=1e-12)
        assert row["pixel_pro_std"].item() == pytest.approx(x.std(ddof=1), abs=1e-12)
        assert row["n"].item() == 3


def test_first_per_class_keeps_the_first_of_each_category_and_label():
    class Fake:
        samples = [{"cls_name": c, "anomaly": y, "i": i}
                   for i, (c, y) in enumerate([("a", 0), ("a", 1), ("a", 0), ("a", 0),
                                               ("b", 1), ("b", 1), ("a", 1)])]

    ds = subsample_dataset(Fake(), 2)
    assert [s["i"] for s in ds.samples] == [0, 1, 2, 4, 5, 6]
    with pytest.raises(ValueError):
        subsample_dataset(Fake(), 0)


def test_run_once_is_reproducible_for_a_seed_and_differs_across_seeds(backbone):
    train, target = random_store(backbone, seed=1), random_store(backbone, seed=2)
    a = ablations.run_once(backbone, SMALL, train, target, TRAIN, EVAL, seed=0)
    b = ablations.run_once(backbone, SMALL, train, target, TRAIN, EVAL, seed=0)
    c = ablations.run_once(backbone, SMALL, train, target, TRAIN, EVAL, seed=1)
    assert set(METRICS) <= set(a) and a["train_s"] > 0
    assert all(a[m] == b[m] for m in METRICS)
    assert any(a[m] != c[m] for m in METRICS)


def test_abnormal_text_embeddings_are_per_image_and_batch_size_free(backbone):
    store = random_store(backbone, n_per_class=3)
    model = BayesPFL(backbone, SMALL, seed=0).eval()
    one = ablations.abnormal_text_embeddings(model, store, draw_seed=5, batch_size=32)
    again = ablations.abnormal_text_embeddings(model, store, draw_seed=5, batch_size=5)
    other = ablations.abnormal_text_embeddings(model, store, draw_seed=6)
    assert one.shape == (len(store), backbone.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, again, atol=1e-6)
    assert np.abs(one - other).max() > 1e-4
    # Reference: the abnormal feature of bank 0 from the model's own forward with the same
    # per-image seeds (from the draw's seed and each image's content key).
    seeds = image_seeds(5, feature_keys(store.feats))
    with torch.no_grad():
        out = model.forward_features(store.feats, store.cls_names, seeds=seeds, bank_index=0,
                                     n_samples=1)
    np.testing.assert_allclose(one, out.text_features[:, 0, 0, 1].numpy(), atol=1e-6)


def test_tsne_draws_is_a_joint_embedding_split_back():
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 3.0
    xa, xb = ablations.tsne_draws([a, b], random_state=0)
    ref = TSNE(n_components=2, perplexity=min(30.0, 23 / 3), init="pca", random_state=0,
               max_iter=1000).fit_transform(np.concatenate([a, b]))
    np.testing.assert_allclose(np.concatenate([xa, xb]), ref)
    assert xa.shape == xb.shape == (12, 2)
    with pytest.raises(ValueError):
        ablations.tsne_draws([a[:1], b[:1]])


def test_backbone_table_has_a_row_per_tower_size_and_seed(backbone):
    stores = (random_store(backbone, seed=1), random_store(backbone, seed=2))
    table = ablations.backbone_table(["pfl-tiny"], [SIZE], lambda bb: stores, SMALL, TRAIN,
                                     EVAL, seeds=(0, 1), timing_images=0,
                                     backbone_factory=lambda tower, size: backbone)
    assert list(table[["tower", "size", "seed"]].itertuples(index=False, name=None)) == [
        ("pfl-tiny", SIZE, 0), ("pfl-tiny", SIZE, 1)]
    assert table["ms_per_image"].isna().all()
    # The same run as run_once for that seed.
    ref = ablations.run_once(backbone, SMALL, *stores, TRAIN, EVAL, seed=1)
    assert all(table.loc[1, m] == ref[m] or (math.isnan(ref[m]) and math.isnan(table.loc[1, m]))
               for m in METRICS)


def test_time_per_image_runs_the_tower_and_the_method(backbone):
    g = torch.Generator().manual_seed(0)
    dataset = [{"image": torch.randn(3, SIZE, SIZE, generator=g), "mask": torch.zeros(SIZE, SIZE),
                "label": 0, "cls_name": "a", "path": f"{i}.png"} for i in range(3)]
    model = BayesPFL(backbone, SMALL, seed=0).eval()
    for clock in ("process", "wall"):
        assert ablations.time_per_image(model, backbone, dataset, [0, 1, 2], clock=clock) > 0
    with pytest.raises(ValueError, match="at least one"):
        ablations.time_per_image(model, backbone, dataset, [])
    with pytest.raises(ValueError, match="clock"):
        ablations.time_per_image(model, backbone, dataset, [0], clock="gpu")
