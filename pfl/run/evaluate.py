"""Zero-shot evaluation of a trained method on every category of a target dataset.

docs/reproduction.md, "Maps, scores and losses" and "Metrics"; appendix A.1 (R = 10 at
inference) and Tables A.4-A.9. R is the method's own (``ModelConfig.mc_test``) unless
``EvalConfig.mc_samples`` sets it for this evaluation; methods that draw no samples (the
peers) have no R and ignore it.

1. The method predicts an abnormal-probability map ``(N, S, S)`` and a score per image.
2. Maps are blurred with a Gaussian of sigma 8 px at 518 px, scaled to the image size
   (``8 * S / 518``: 3.46 px at 224), before any pixel metric.
3. Image score, ``EvalConfig.image_score``:
   ``"per_image"`` (default) the method's own score (Bayes-PFL: the global score);
   ``"official_minmax"`` the authors' transductive recipe: per category, over the whole test
   set, min-max normalise the method's score and the mean of the top-k smoothed map values
   (k = 2000 at 518 px, scaled by area: 374 at 224), then average them with weight 0.5 each.
   It uses the other test images of the category, so one image's score depends on the test
   set; use it only to compare with published numbers.
   ``"official"`` the authors' recipe exactly (:func:`official_scores`): the top-k mean of the
   *raw* (unsmoothed) map with k = 20 for their small-defect categories and 2000 otherwise
   (not scaled), ``+1e-8`` in the min-max denominators, and for datasets without masks
   (HeadCT, BrainMRI, Br35H) the min-max normalised method score alone.
4. Metrics per category and their mean (:func:`pfl.run.metrics.evaluate_records`), collected in a
   :class:`pfl.run.results.Results` that prints the appendix's tables.
5. With ``EvalConfig.uncertainty`` (``pfl evaluate --uncertainty``) the per-image table
   (``samples/<dataset>.csv``) gains ``std_mean`` and ``std_max``: the mean and maximum over
   the image's pixels of the per-pixel standard deviation over the R Monte Carlo prompt samples
   (``Prediction.map_std``), asked for in the same ``predict`` call as the map, so from the same
   R draws. The std is not smoothed (step 2 applies to the map only) and changes no metric.
   Methods that draw no samples (the peers) have none: asking is a ``ValueError``.

>>> round(scaled_sigma(8.0, 518), 3), round(scaled_sigma(8.0, 224), 3)
(8.0, 3.459)
>>> scaled_topk(2000, 518), scaled_topk(2000, 224)
(2000, 374)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pfl.config import EvalConfig, Profile
from pfl.data.preprocess import denormalize
from pfl.method.contract import Method
from pfl.method.official import (
    FUSION_WEIGHT,
    IMAGE_ONLY_DATASETS,
    MINMAX_EPS,
    TOPK_LARGE,
    TOPK_SMALL,
    TOPK_SMALL_CLASSES,
)
from pfl.run import distributed
from pfl.run.checkpoints import load_run
from pfl.run.features import (
    FeatureStore,
    data_root,
    profile_dataset,
    profile_store,
    progress_enabled,
)
from pfl.run.inputs import check_run
from pfl.run.metrics import METRICS, evaluate_records, image_metrics
from pfl.run.postprocess import (
    IMAGE_SCORES,
    predict_with_std,
    safe_name,
    scaled_sigma,
    scaled_topk,
    smooth_maps,
    topk_mean,
)
from pfl.run.results import PAPER_TABLES, Results
from pfl.utils import atomic_write
from pfl.viz.plots import plot_anomaly_maps, save_figure


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def official_minmax_scores(scores: np.ndarray, maps: np.ndarray, cls_names: Sequence[str],
                           k: int) -> np.ndarray:
    """The authors' transductive image score (module docstring): per category,
    ``0.5 * minmax(scores) + 0.5 * minmax(topk_mean(maps, k))``.

    >>> s = official_minmax_scores(np.array([0.2, 0.4, 0.9, 0.1]),
    ...     np.array([[[0.0]], [[1.0]], [[0.5]], [[0.5]]]), ["a", "a", "b", "b"], k=1)
    >>> s.round(3).tolist()
    [0.0, 1.0, 0.5, 0.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    local = topk_mean(maps, k).astype(np.float64)
    out = np.empty_like(scores)
    names = np.asarray(cls_names)
    for c in np.unique(names):
        rows = names == c
        out[rows] = 0.5 * _minmax(scores[rows]) + 0.5 * _minmax(local[rows])
    return out


def official_topk(cls_name: str) -> int:
    """The authors' k for the top-k mean of a category's raw maps (20 for small defects)."""
    return TOPK_SMALL if cls_name in TOPK_SMALL_CLASSES else TOPK_LARGE


def official_scores(scores: np.ndarray, raw_topk: np.ndarray, cls_names: Sequence[str],
                    image_only: bool = False) -> np.ndarray:
    """The authors' test-set image score: per category ``0.5 * mm(scores) + 0.5 * mm(raw_topk)``
    with ``mm(x) = (x - min) / (max - min + 1e-8)``; ``image_only``: ``mm(scores)`` alone.

    Args:
        scores: ``(N,)`` the method's own scores.
        raw_topk: ``(N,)`` mean of the :func:`official_topk` largest values of each raw map.

    >>> official_scores(np.array([0.2, 0.4]), np.array([1.0, 0.0]), ["a", "a"]).round(6).tolist()
    [0.5, 0.5]
    """
    scores = np.asarray(scores, dtype=np.float64)
    local = np.asarray(raw_topk, dtype=np.float64)
    names = np.asarray(cls_names)
    out = np.empty_like(scores)

    def mm(x):
        return (x - x.min()) / (x.max() - x.min() + MINMAX_EPS)

    for c in np.unique(names):
        rows = names == c
        out[rows] = mm(scores[rows]) if image_only else (
            FUSION_WEIGHT * mm(scores[rows]) + (1 - FUSION_WEIGHT) * mm(local[rows]))
    return out


def image_auroc_by_category(scores: np.ndarray, labels: np.ndarray,
                            cls_names: Sequence[str]) -> pd.Series:
    """Image AUROC of ``scores`` per category and their ``mean`` (the tables' convention).

    >>> image_auroc_by_category(np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 0, 1]),
    ...                         ["a", "a", "b", "b"]).tolist()
    [1.0, 0.0, 0.5]
    """

    names = np.asarray(cls_names)
    per = {c: image_metrics(np.asarray(scores)[names == c], np.asarray(labels)[names == c])
           ["image_auroc"] for c in sorted(set(cls_names))}
    out = pd.Series(per, name="image_auroc")
    out["mean"] = float(np.mean(list(per.values())))
    return out


def linear_probe_auroc(train: FeatureStore, test: FeatureStore, feature: str = "global",
                       C: float = 1.0) -> pd.Series:
    """A ceiling for image scores computed from one frozen feature: logistic regression
    (scikit-learn) fitted on ``train``'s image labels, scored on ``test``'s unseen categories.

    Bayes-PFL's global score is a function of the CLS feature alone (docs/reproduction.md,
    "Maps, scores and losses"), so when a *supervised* probe of that feature does not transfer
    to the target categories, no training of the prompts can make the global score transfer either.

    Args:
        feature: ``"global"`` (the projected CLS feature) or ``"patch_mean"`` (the mean
            patch token of the last tapped layer). Features are L2-normalised.
        C: inverse regularisation strength.
    Returns:
        the probe's image AUROC per test category and the ``mean``.
    """
    from sklearn.linear_model import LogisticRegression

    def features(store: FeatureStore) -> np.ndarray:
        if feature == "global":
            x = store.feats.global_.double()
        elif feature == "patch_mean":
            x = store.feats.patches[:, -1].double().mean(1)
        else:
            raise ValueError(f"linear_probe_auroc: feature must be 'global' or 'patch_mean', "
                             f"got {feature!r}")
        return torch.nn.functional.normalize(x, dim=-1).numpy()

    labels = train.labels.numpy()
    if len(set(labels.tolist())) < 2:
        raise ValueError("linear_probe_auroc: the training store needs normal and anomalous "
                         "images")
    probe = LogisticRegression(C=C, max_iter=2000).fit(features(train), labels)
    return image_auroc_by_category(probe.decision_function(features(test)),
                                   test.labels.numpy(), test.cls_names)


@dataclass
class PredictionSet:
    """A method's outputs on a store: smoothed maps ``(N, S, S)`` (float64 in smoke), its own
    scores ``(N,)``, and the ground truth (masks uint8, labels, class names, paths); with
    ``EvalConfig.uncertainty`` the mean and max per image of the unsmoothed per-pixel std over
    the R samples (``std_mean``, ``std_max``, ``(N,)`` float64), else None."""

    maps: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    cls_names: list[str]
    paths: list[str]
    has_mask: bool = True
    raw_topk: np.ndarray | None = None  # (N,) top-k mean of the raw maps, k per official_topk
    std_mean: np.ndarray | None = None
    std_max: np.ndarray | None = None


def predict_store(method: Method, store: FeatureStore, cfg: EvalConfig | None = None, *,
                  progress: bool | None = None, desc: str = "predict") -> PredictionSet:
    """Run ``method.predict`` on every batch of ``store`` (no gradients, one generator seeded
    with ``cfg.seed``) and blur the maps (:func:`smooth_maps`, sigma scaled to the size).
    With ``cfg.uncertainty`` the same calls also give the per-pixel std over the R samples
    (:func:`pfl.run.postprocess.predict_with_std`), kept as its mean and max per image
    (unsmoothed); a method that gives none (the peers) is a ``ValueError``.

    Under torchrun each rank predicts one block of batches and every rank gets all of them
    back, the same arrays as one process (:mod:`pfl.run.distributed`)."""
    cfg = cfg or EvalConfig()
    train_mode = getattr(method, "train", None)
    if callable(train_mode):
        train_mode(False)
    # R, for methods that sample (their predict takes n_samples; the peers draw nothing)
    kw = ({"n_samples": cfg.mc_samples}
          if cfg.mc_samples is not None and getattr(method, "takes_n_samples", False) else {})
    gen = torch.Generator().manual_seed(cfg.seed)
    sigma = scaled_sigma(cfg.sigma, store.image_size)
    maps, scores, masks, labels, names, paths, raw_topk = [], [], [], [], [], [], []
    std_mean, std_max = [], []
    state = gen.get_state()
    part = distributed.prediction_block(method, store, cfg.batch_size, gen)
    bar = tqdm(total=len(part), desc=desc, unit="img",
               disable=not (progress_enabled(progress) and distributed.is_main()))
    needs_images = bool(getattr(method, "needs_images", False))
    with torch.no_grad():
        for batch in part.batches(cfg.batch_size, with_images=needs_images):
            pred, std = predict_with_std(
                method, batch, gen, cfg.uncertainty,
                option="the std_mean/std_max columns (EvalConfig.uncertainty)",
                fix="evaluate it without --uncertainty (EvalConfig(uncertainty=False))", **kw)
            if std is not None:
                flat = std.reshape(len(batch), -1)
                std_mean.append(flat.mean(axis=1))
                std_max.append(flat.max(axis=1))
            if pred.maps.shape != batch.masks.shape:
                raise ValueError(f"{method.name}.predict gave maps {tuple(pred.maps.shape)} for "
                                 f"masks {tuple(batch.masks.shape)}: maps must be (N, S, S) at "
                                 "the input size")
            raw = pred.maps.detach().float().cpu().numpy().reshape(len(batch), -1)
            raw_topk += [topk_mean(raw[i:i + 1], official_topk(c))[0]
                         for i, c in enumerate(batch.cls_names)]
            maps.append(smooth_maps(pred.maps, sigma))
            scores.append(pred.scores.detach().cpu().numpy())
            masks.append(batch.masks.to(torch.uint8).numpy())
            labels.append(batch.labels.numpy())
            names += batch.cls_names
            paths += batch.paths
            bar.update(len(batch))
    bar.close()
    distributed.check_no_draws(method, state, gen)
    pred = PredictionSet(
        maps=np.concatenate(maps), scores=np.concatenate(scores).astype(np.float64),
        masks=np.concatenate(masks), labels=np.concatenate(labels), cls_names=names,
        paths=paths, has_mask=store.has_mask, raw_topk=np.asarray(raw_topk, dtype=np.float64),
        std_mean=np.concatenate(std_mean) if std_mean else None,
        std_max=np.concatenate(std_max) if std_max else None,
    ) if names else None
    pred = distributed.gather(pred, _concat_predictions)
    if pred is None:
        raise ValueError(f"predict_store ({desc}): the store has no images")
    return pred


def _concat_predictions(parts: list[PredictionSet]) -> PredictionSet | None:
    """One :class:`PredictionSet` from consecutive blocks of a store, in order."""
    if not parts:
        return None
    return PredictionSet(
        maps=np.concatenate([p.maps for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        cls_names=[c for p in parts for c in p.cls_names],
        paths=[q for p in parts for q in p.paths], has_mask=parts[0].has_mask,
        raw_topk=np.concatenate([p.raw_topk for p in parts]),
        std_mean=_concat_optional([p.std_mean for p in parts]),
        std_max=_concat_optional([p.std_max for p in parts]),
    )


def _concat_optional(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    return None if any(a is None for a in arrays) else np.concatenate(arrays)


def image_scores(pred: PredictionSet, cfg: EvalConfig, name: str = "") -> np.ndarray:
    """The image score per ``cfg.image_score`` (module docstring); ``name``: the dataset."""
    if cfg.image_score == "per_image":
        return pred.scores
    if cfg.image_score == "official":
        image_only = not pred.has_mask or name.lower() in IMAGE_ONLY_DATASETS
        return official_scores(pred.scores, pred.raw_topk, pred.cls_names, image_only)
    if cfg.image_score == "official_minmax":
        k = scaled_topk(cfg.topk, pred.maps.shape[-1])
        return official_minmax_scores(pred.scores, pred.maps, pred.cls_names, k)
    raise ValueError(f"EvalConfig.image_score must be one of {IMAGE_SCORES}, got "
                     f"{cfg.image_score!r}")


@dataclass
class EvalResult:
    """One dataset's evaluation.

    table: per-category metrics (fractions) and their ``mean`` row (columns
    :data:`pfl.run.metrics.METRICS`). samples: one row per image (path, category, label, image
    score, the method's own score, map max; with ``EvalConfig.uncertainty`` ``std_mean`` and
    ``std_max``, module docstring step 5). predictions: kept when asked for.
    """

    name: str
    table: pd.DataFrame
    samples: pd.DataFrame
    predictions: PredictionSet | None = None
    figures: list[Path] = field(default_factory=list)


def evaluate(method: Method, store: FeatureStore, cfg: EvalConfig | None = None, *,
             name: str = "target", keep_predictions: bool = False,
             figures_dir: str | Path | None = None, figure_prefix: str = "",
             progress: bool | None = None) -> EvalResult:
    """Zero-shot metrics of ``method`` on every category of ``store``.

    Args:
        cfg: blur sigma, image score recipe, AUPRO variant, batch size, seed, and
            ``uncertainty``: the per-image ``std_mean``/``std_max`` columns of ``samples``
            (module docstring, step 5; the blur does not apply to the std).
        name: dataset name (tables, figure names).
        keep_predictions: keep the smoothed maps in the result (memory: N x S x S floats).
        figures_dir: if given, one qualitative figure per category is written there
            (``<prefix><name>_<category>.png`` and the CSV beside it).
    """
    cfg = cfg or EvalConfig()
    pred = predict_store(method, store, cfg, progress=progress, desc=f"{name}")
    scores = image_scores(pred, cfg, name)
    records = [
        {"cls_name": c, "score": float(s), "label": int(y), "anomaly_map": m, "mask": k,
         "path": p}
        for c, s, y, m, k, p in zip(pred.cls_names, scores, pred.labels, pred.maps, pred.masks,
                                    pred.paths)
    ]
    table = evaluate_records(records, has_masks=pred.has_mask, aupro=cfg.aupro)
    samples = pd.DataFrame({
        "path": pred.paths, "category": pred.cls_names, "label": pred.labels,
        "score": scores, "method_score": pred.scores,
        "map_max": pred.maps.reshape(len(pred.maps), -1).max(axis=1),
    })
    if pred.std_mean is not None:
        samples["std_mean"], samples["std_max"] = pred.std_mean, pred.std_max
    result = EvalResult(name=name, table=table, samples=samples,
                        predictions=pred if keep_predictions else None)
    if figures_dir is not None and distributed.is_main():
        result.figures = qualitative_figures(store, pred, figures_dir, name, figure_prefix)
    return result


def _relative_to_root(path: str, dataset) -> str:
    """``path`` relative to the dataset's root folder when it lies inside it (so that a figure's
    CSV is the same on every machine), else unchanged."""
    while dataset is not None and getattr(dataset, "root", None) is None:
        dataset = getattr(dataset, "dataset", None)
    root = getattr(dataset, "root", None)
    if root is None:
        return path
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path


def qualitative_figures(store: FeatureStore, pred: PredictionSet, figures_dir: str | Path,
                        name: str, prefix: str = "", per_category: int = 4) -> list[Path]:
    """One figure per category: its first ``per_category`` anomalous test images with the
    ground-truth outline (top) and the smoothed map (bottom, min-max over the figure's maps,
    as the paper's qualitative figures A.10-A.34), saved with the CSV behind it (image paths
    relative to the dataset's root)."""
    import matplotlib.pyplot as plt


    if store.dataset is None:
        return []
    out = []
    names = np.asarray(pred.cls_names)
    for c in sorted(set(pred.cls_names)):
        rows = [i for i in np.flatnonzero(names == c) if pred.labels[i] == 1][:per_category]
        if not rows:
            rows = list(np.flatnonzero(names == c)[:per_category])
        images = [denormalize(store.dataset[store.indices[i]]["image"]) for i in rows]
        fig = plot_anomaly_maps(images, [pred.masks[i] for i in rows],
                                [pred.maps[i] for i in rows],
                                titles=[Path(pred.paths[i]).name for i in rows],
                                suptitle=f"{name} / {c}")
        csv = pd.DataFrame({
            "path": [_relative_to_root(pred.paths[i], store.dataset) for i in rows],
            "label": [int(pred.labels[i]) for i in rows],
            "score": [float(pred.scores[i]) for i in rows],
            "map_min": [float(pred.maps[i].min()) for i in rows],
            "map_max": [float(pred.maps[i].max()) for i in rows],
            "defect_pixels": [int(pred.masks[i].sum()) for i in rows],
        })
        out.append(save_figure(fig, Path(figures_dir) / f"{prefix}{safe_name(f'{name}_{c}')}.png",
                               csv=csv, dpi=80))
        plt.close(fig)
    return out


def evaluate_all(method: Method, stores: Mapping[str, FeatureStore],
                 cfg: EvalConfig | None = None, *, out_dir: str | Path | None = None,
                 method_name: str | None = None, results: Results | None = None,
                 seed: int = 0, figures: bool = True, progress: bool | None = None
                 ) -> tuple[Results, dict[str, EvalResult]]:
    """Evaluate ``method`` on several target datasets; collect every value in a
    :class:`pfl.run.results.Results` (``method_name``, dataset, category, metric, ``seed``).

    With ``out_dir``: ``results.csv`` (long form), per dataset ``tables/<dataset>.csv/.md``
    (categories x metrics) and ``tables/<dataset>_tableA4.md`` ... ``A9`` (the appendix
    tables, categories x methods), ``samples/<dataset>.csv`` (per-image scores) and
    ``figures/<dataset>_<category>.png`` (+ CSV).
    """
    cfg = cfg or EvalConfig()
    results = results if results is not None else Results()
    method_name = method_name or method.name
    evals = {}
    out = Path(out_dir) if out_dir is not None else None
    out = out if distributed.is_main() else None  # under torchrun rank 0 alone writes
    for name, store in stores.items():
        res = evaluate(method, store, cfg, name=name, progress=progress,
                       figures_dir=(out / "figures") if (out is not None and figures) else None)
        results.add_metrics(res.table, method_name, name, seed=seed)
        evals[name] = res
        if out is not None:

            atomic_write(out / "samples" / f"{name}.csv",
                         lambda p, r=res: r.samples.to_csv(p, index=False))
    if out is not None:
        write_tables(results, out)
    return results, evals


def write_tables(results: Results, out_dir: str | Path) -> list[Path]:
    """Every table of ``results`` under ``out_dir/tables`` plus ``out_dir/results.csv``."""
    out = Path(out_dir)
    written = [results.to_csv(out / "results.csv")]
    frame = results.frame
    for dataset in dict.fromkeys(frame["dataset"]):
        for method in dict.fromkeys(frame.loc[frame["dataset"] == dataset, "method"]):
            name = dataset if frame["method"].nunique() == 1 else f"{dataset}_{method}"
            stem = out / "tables" / safe_name(name)
            written += results.metrics_table(method, dataset).save(stem)
        for number in PAPER_TABLES:
            written += results.paper_table(number, dataset).save(
                out / "tables" / safe_name(f"{dataset}_table{number}"), bold_best=True)
    return written


def summary_frame(results: Results, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean over categories per (method, dataset) and metric, fractions: one row each."""

    metrics = list(metrics or METRICS)
    rows = {}
    frame = results.frame
    for (method, dataset) in dict.fromkeys(zip(frame["method"], frame["dataset"])):
        t = results.metrics_table(method, dataset, metrics).values
        rows[(method, dataset)] = t.loc["mean"]
    out = pd.DataFrame.from_dict(rows, orient="index")[metrics]
    out.index = pd.MultiIndex.from_tuples(out.index, names=["method", "dataset"])
    return out



def evaluate_profile(method: Method, profile, out_dir: str | Path | None = None, *,
                     datasets: Sequence[str | Path] | None = None,
                     method_name: str | None = None, results: Results | None = None,
                     seed: int = 0, figures: bool = True, progress: bool | None = None
                     ) -> tuple[Results, dict[str, EvalResult]]:
    """:func:`evaluate_all` on the test splits of the profile's target datasets
    (``profile.data.targets`` unless ``datasets`` names others: names under its data root, or
    folders holding a meta.json, see :func:`resolve_datasets`). Results are named by folder."""

    found = resolve_datasets(profile, datasets)
    stores = {n: profile_store(profile, method.backbone, str(p), "test", progress=progress)
              for n, p in found.items()}
    return evaluate_all(method, stores, profile.eval, out_dir=out_dir, method_name=method_name,
                        results=results, seed=seed, figures=figures, progress=progress)


def resolve_datasets(profile, datasets: Sequence[str | Path] | None = None) -> dict[str, Path]:
    """``{name: folder}`` of the datasets to evaluate: each entry of ``datasets`` (default
    ``profile.data.targets``) is a folder name under the profile's data root, or a path to a
    folder holding a ``meta.json`` (absolute, or relative to the current folder; a bare name is
    looked up under the data root first). The name is the folder's own name."""
    root = data_root(profile.data.root)
    out: dict[str, Path] = {}
    for entry in list(datasets or profile.data.targets):
        text = str(entry)
        under_root = root / text
        as_path = Path(os.path.abspath(Path(text).expanduser()))
        bare = os.sep not in text and not text.startswith(("~", "."))
        if bare and (profile.data.synthetic or under_root.is_dir() or not as_path.is_dir()):
            if not under_root.is_dir() and not profile.data.synthetic:
                have = sorted(d.name for d in root.iterdir() if (d / "meta.json").is_file()
                              ) if root.is_dir() else []
                raise FileNotFoundError(
                    f"dataset {text!r} is not under the run's data root {root} (it has "
                    f"{have or 'no datasets'}): pass one of those names, or the path of a "
                    "folder holding a meta.json")
            folder = under_root
        else:
            folder = as_path
            if not (folder / "meta.json").is_file():
                raise FileNotFoundError(
                    f"dataset folder {text} holds no meta.json: write one with `python -m pfl "
                    "data convert DATASET --root DIR`, or pass a name under the data root "
                    f"{root}")
        name = folder.name
        if name in out and out[name] != folder:
            raise ValueError(f"two datasets are named {name!r} ({out[name]} and {folder}): "
                             "their tables would overwrite each other; evaluate them one at a "
                             "time with different --out folders")
        out[name] = folder
    return out


def check_evaluation(checkpoint: str | Path, out_dir: str | Path | None = None,
                     datasets: Sequence[str | Path] | None = None):
    """Check a run folder, an output folder and the datasets before any model loads: the
    run's ``config.json`` and checkpoint exist, ``out_dir`` is not a file, every dataset's
    meta.json is well formed and every file it names exists, with masks of their images'
    sizes. Returns the run's profile and ``{name: folder}`` of the datasets."""
    run = check_run(checkpoint)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a folder path (it is created)")
    profile = Profile.from_dict(run["profile"])
    found = resolve_datasets(profile, datasets)
    for folder in found.values():
        ds = profile_dataset(profile, str(folder), "test")
        problems = ds.problems(decode=False)
        if problems:
            lines = "\n".join(f"  {why}" for _, why in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ValueError(
                f"{len(problems)} of {len(ds)} test samples of {folder / 'meta.json'} cannot "
                f"be used:\n{lines}{more}\nrestore or replace the files, or rebuild meta.json "
                "(`python -m pfl data convert DATASET --root DIR --check` lists every problem)")
    return profile, found


def evaluate_run(checkpoint: str | Path, out_dir: str | Path, *,
                 datasets: Sequence[str | Path] | None = None, progress: bool | None = None,
                 **eval_overrides) -> tuple[Results, dict[str, EvalResult]]:
    """Rebuild a training run (:func:`pfl.run.checkpoints.load_run`) and evaluate it zero-shot
    on ``datasets`` (:func:`resolve_datasets`; default: the run's targets), after checking
    the run, the output folder and the datasets (:func:`check_evaluation`).

    ``eval_overrides``: :class:`EvalConfig` fields to change for this evaluation (e.g.
    ``mc_samples=20``, ``image_score="official_minmax"``, ``uncertainty=True``); ``None``
    values are ignored.
    """

    _, found = check_evaluation(checkpoint, out_dir, datasets)
    method, profile = load_run(checkpoint)
    distributed.place(method)  # under torchrun with nccl: this rank's GPU
    overrides = {k: v for k, v in eval_overrides.items() if v is not None}
    if overrides:
        profile = replace(profile, eval=replace(profile.eval, **overrides))
    return evaluate_profile(method, profile, out_dir, datasets=list(found.values()),
                            progress=progress)
