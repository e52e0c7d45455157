"""benchmarks/smoke_quality.py's functions (the script itself takes over a minute even in its
--tiny mode on a busy 2-core machine, so it is not run here)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfl.clip.zeroshot import zero_shot_maps
from pfl.method.contract import Batch

spec = importlib.util.spec_from_file_location(
    "smoke_quality", Path(__file__).parents[1] / "benchmarks" / "smoke_quality.py")
sq = importlib.util.module_from_spec(spec)
sys.modules["smoke_quality"] = sq  # dataclasses look their module up
spec.loader.exec_module(sq)


def _scored(values: dict, reps: dict) -> "sq.Scored":
    return sq.Scored(exact=values, replicates=reps, full_sample=values, predict_s=1.0,
                     bootstrap_s=1.0, n_images=10)


def test_summarise_means_exact_and_averages_replicates():
    rng = np.random.default_rng(0)
    runs = []
    for v in (0.7, 0.8):
        reps = {k: v + 0.01 * rng.normal(size=50) for k in sq.METRICS}
        runs.append(_scored(dict.fromkeys(sq.METRICS, v), reps))
    out = sq.summarise(runs)
    mean, se, reps = out["pixel_auroc"]
    assert mean == pytest.approx(0.75)
    want = np.mean([r.replicates["pixel_auroc"] for r in runs], axis=0)
    np.testing.assert_allclose(reps, want)
    assert se == pytest.approx(want.std(ddof=1))


def _table(values: dict[str, dict[str, float]]) -> dict:
    rng = np.random.default_rng(1)
    noise = rng.normal(size=100) * 0.01  # shared: paired differences have s.e. 0
    return {row: {k: (v, 0.01, v + noise) for k, v in metrics.items()}
            for row, metrics in values.items()}


def test_gates_compare_as_the_issue_says():
    base = dict.fromkeys(sq.METRICS, 0.5)
    values = {row: dict(base) for row in sq.ROWS}
    values[sq.TRAINED] |= {"image_auroc": 0.80, "pixel_auroc": 0.90, "pixel_ap": 0.20}
    values[sq.UNTRAINED]["image_auroc"] = 0.60  # +0.20: pass
    values[sq.ZERO_SHOT]["pixel_auroc"] = 0.88  # +0.02: fail
    values[sq.COLOUR]["pixel_auroc"] = 0.82  # +0.08: pass (>=)
    values[sq.TRAINED_R1]["pixel_ap"] = 0.20  # a tie does not beat: fail
    results = sq.gates(_table(values))
    assert [ok for _, ok, _ in results] == [True, True, False, True, False]
    assert [name[:2] for name, _, _ in results] == ["G1", "G2", "G3", "G4", "G5"]
    assert "difference 0.020 +- 0.000" in results[2][2]


def test_tower_zero_shot_is_the_last_block_of_zero_shot_maps(tiny_backbone):
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    batch = Batch(cls_names=["x"] * 3, images=images)
    pred = sq.TowerZeroShot(tiny_backbone).predict(batch, torch.Generator())
    want = zero_shot_maps(tiny_backbone, images, "object")
    torch.testing.assert_close(pred.maps, want[:, -1])
    mean = sq.TowerZeroShot(tiny_backbone, layers="mean").predict(batch, torch.Generator())
    torch.testing.assert_close(mean.maps, want.mean(1))
    assert pred.scores.shape == (3,) and ((pred.scores > 0) & (pred.scores < 1)).all()
    one = sq.TowerZeroShot(tiny_backbone).predict(Batch(cls_names=["x"], images=images[1:2]),
                                                  torch.Generator())
    torch.testing.assert_close(one.scores[0], pred.scores[1])
