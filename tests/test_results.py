"""Tests of pfl.run.results: long-form store, per-category tables, CSV and Markdown."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pfl.run import metrics
from pfl.run.results import MEAN, Results, Table


def filled(seeds=(0,)) -> Results:
    """Two methods x three categories x two metrics, values from a seeded generator."""
    rng = np.random.default_rng(0)
    r = Results()
    for seed in seeds:
        for method in ("APRIL-GAN", "Bayes-PFL"):
            for cat in ("bottle", "cable", "nan"):  # a category called "nan" must survive CSV
                for metric in ("pixel_auroc", "image_auroc"):
                    r.add(method, "mvtec", cat, metric, rng.uniform(0.5, 1.0), seed)
    return r


def test_table_layout_values_and_mean_row():
    r = filled()
    t = r.paper_table("A.4", "mvtec")
    assert list(t.values.index) == ["bottle", "cable", "nan", MEAN]
    assert list(t.values.columns) == ["APRIL-GAN", "Bayes-PFL"]
    f = r.frame
    want = f[(f.method == "Bayes-PFL") & (f.metric == "pixel_auroc")].set_index("category")
    for cat in ("bottle", "cable", "nan"):
        assert t.values.loc[cat, "Bayes-PFL"] == want.loc[cat, "value"]
    assert t.values.loc[MEAN, "Bayes-PFL"] == pytest.approx(want["value"].mean(), abs=1e-12)
    assert t.std is None
    assert t.caption.startswith("Table A.4")


def test_percent_with_one_decimal():
    r = Results()
    r.add("m", "d", "bottle", "image_auroc", 0.91849)
    r.add("m", "d", "cable", "image_auroc", 1.0)
    r.add("m", "d", "grid", "image_auroc", math.nan)  # undefined metric
    t = r.table("image_auroc", "d")
    assert t.formatted()["m"].tolist() == ["91.8", "100.0", "-", "95.9"]
    assert "91.8" in str(t) and "0.918" not in str(t)


def test_seeds_give_mean_and_sample_std():
    r = Results()
    for seed, (a, b) in enumerate([(0.80, 0.60), (0.90, 0.70), (0.85, 0.80)]):
        r.add("m", "d", "a", "pixel_pro", a, seed)
        r.add("m", "d", "b", "pixel_pro", b, seed)
    t = r.table("pixel_pro", "d")
    assert t.values.loc["a", "m"] == pytest.approx(0.85)
    assert t.std.loc["a", "m"] == pytest.approx(np.std([0.80, 0.90, 0.85], ddof=1))
    # the mean row is the mean over categories per seed, then mean +- std over seeds
    per_seed = [(0.80 + 0.60) / 2, (0.90 + 0.70) / 2, (0.85 + 0.80) / 2]
    assert t.values.loc[MEAN, "m"] == pytest.approx(np.mean(per_seed))
    assert t.std.loc[MEAN, "m"] == pytest.approx(np.std(per_seed, ddof=1))
    assert t.formatted().loc["a", "m"] == "85.0 ± 5.0"


def test_results_round_trip_through_csv(tmp_path):
    r = filled(seeds=(0, 1))
    r.add("Bayes-PFL", "visa", "pcb1", "pixel_pro", math.nan)
    r.to_csv(tmp_path / "results.csv")
    back = Results.from_csv(tmp_path / "results.csv")
    pd.testing.assert_frame_equal(
        back.frame, r.frame, check_exact=True
    )  # exact, NaN and "nan" category kept
    assert len(back) == len(r) == 2 * 2 * 3 * 2 + 1  # seeds x methods x categories x metrics


def test_table_round_trips_through_csv_and_writes_markdown(tmp_path):
    t = filled(seeds=(0, 1, 2)).table("image_auroc", "mvtec")
    csv, md = t.save(tmp_path / "a5", bold_best=True)
    back = Table.from_csv(csv)
    pd.testing.assert_frame_equal(back.values, t.values, check_exact=True)
    pd.testing.assert_frame_equal(back.std, t.std, check_exact=True)
    text = md.read_text()
    lines = text.splitlines()
    assert lines[2] == "| category | APRIL-GAN | Bayes-PFL |"
    assert lines[3] == "|---|---:|---:|"
    # one bold cell per row: the best method
    for line, (_, row) in zip(lines[4:], t.values.iterrows()):
        best = row.idxmax()
        cells = line.strip("|").split("|")
        assert cells[1 + list(row.index).index(best)].strip().startswith("**")
        assert sum("**" in c for c in cells) == 1


def test_add_metrics_from_evaluate_records_and_metrics_table():
    table = pd.DataFrame(
        {m: [0.9, 0.7] for m in metrics.METRICS}, index=pd.Index(["a", "b"], name="category")
    )
    table.loc[MEAN] = table.mean()
    r = Results()
    r.add_metrics(table, "Bayes-PFL", "mvtec", seed=0)
    assert len(r) == 2 * len(metrics.METRICS)  # mean row not stored
    t = r.metrics_table("Bayes-PFL", "mvtec")
    assert list(t.values.columns) == list(metrics.METRICS)
    assert t.values.loc[MEAN].tolist() == pytest.approx([0.8] * len(metrics.METRICS))


def test_bad_values_are_refused():
    r = Results()
    with pytest.raises(ValueError, match="not percent"):
        r.add("m", "d", "c", "image_auroc", 91.8)
    r.add("m", "d", "c", "image_auroc", 0.918)
    with pytest.raises(ValueError, match="already stored"):
        r.add("m", "d", "c", "image_auroc", 0.9)
    with pytest.raises(ValueError, match="unknown table"):
        r.paper_table("A.1", "d")
