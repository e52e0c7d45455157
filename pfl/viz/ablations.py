"""Ablation sweeps (appendix B.3: Figure A.2, Table A.2) and the text-embedding t-SNE (B.4, A.4).

A sweep varies one :class:`pfl.config.ModelConfig` field at a time around a base config, as
Figure A.2 does (B, K, P, Q), and for every value and seed trains a fresh
``BayesPFL`` with :func:`pfl.run.train.fit` on auxiliary features and scores it
zero-shot on target features with :func:`pfl.run.evaluate.evaluate`. Every run reads the same
cached frozen-tower features (:mod:`pfl.run.features`), so only the new modules cost time. The
result is a tidy frame, one row per run; :func:`summarise` gives the mean and spread over seeds.

Randomness: a run with seed ``s`` initialises the new modules with ``s``
(``BayesPFL(seed=s)``), trains with ``TrainConfig.seed = s`` (batch order, bank index and
Monte Carlo draws) and evaluates with ``EvalConfig.seed = s``. The base config appears in
every one-at-a-time sweep; it is trained once per seed and its row shared.

Table A.2 (:func:`backbone_table`) repeats a run for several towers and input sizes and adds
the inference time per image (frozen tower plus method, one image at a time).

Figure A.4 (:func:`abnormal_text_embeddings`, :func:`tsne_draws`): with ISD every test image
has its own text embedding ``Z^t_{b,r}``; two independent Monte Carlo draws give two point
clouds, embedded jointly by scikit-learn's t-SNE so that the two panels share coordinates.

>>> from pfl.config import ModelConfig
>>> [(p, v) for p, v, _ in one_at_a_time(ModelConfig(), {"n_prompts": [1, 3]})]
[('n_prompts', 1), ('n_prompts', 3)]
>>> SYMBOLS["flow_length"], PAPER_GRIDS["flow_length"]
('K', (1, 5, 10, 15, 20))
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pfl.clip.backbone import Backbone, resolve_weights
from pfl.config import BackboneConfig, EvalConfig, ModelConfig, TrainConfig
from pfl.method.contract import Batch
from pfl.method.model import BayesPFL
from pfl.run.evaluate import evaluate
from pfl.run.features import (
    FeatureStore,
    _stack_samples,
)
from pfl.run.metrics import METRICS
from pfl.run.train import fit

# Figure A.2's grids (appendix B.3): B in 1..5, K in {1, 5, 10, 15, 20}, P and Q in 1..9.
PAPER_GRIDS: dict[str, tuple[int, ...]] = {
    "n_prompts": (1, 2, 3, 4, 5),
    "flow_length": (1, 5, 10, 15, 20),
    "n_ctx": tuple(range(1, 10)),
    "n_state": tuple(range(1, 10)),
}
SYMBOLS = {"n_prompts": "B", "flow_length": "K", "n_ctx": "P", "n_state": "Q",
           "mc_test": "R", "mc_train": "R_train"}


def one_at_a_time(base: ModelConfig, grid: Mapping[str, Sequence]
                  ) -> list[tuple[str, object, ModelConfig]]:
    """``(field, value, config)`` for every value of every field, the others at ``base``."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(grid) - names)
    if unknown:
        raise ValueError(f"sweep grid names {unknown}, which are not ModelConfig fields; "
                         f"use some of {sorted(names)}")
    return [(p, v, dataclasses.replace(base, **{p: v})) for p, values in grid.items()
            for v in values]


def train_bayes_pfl(backbone: Backbone, model_cfg: ModelConfig, train: FeatureStore,
                    train_cfg: TrainConfig, seed: int, *, eval_cfg: EvalConfig | None = None,
                    out_dir: str | Path | None = None, progress: bool | None = False):
    """A fresh ``BayesPFL`` (init seed ``seed``) trained by :func:`pfl.run.train.fit`
    with ``train_cfg.seed = seed``; checkpoints go to ``out_dir`` (None: a temporary folder)."""

    cfg = dataclasses.replace(train_cfg, seed=seed)
    model = BayesPFL(backbone, model_cfg, seed=seed, train_cfg=cfg)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="pfl-ablation-") as tmp:
            fit(model, train, cfg, tmp, eval_cfg=eval_cfg, resume=False, progress=progress)
    else:
        fit(model, train, cfg, out_dir, eval_cfg=eval_cfg, resume=False, progress=progress)
    return model.eval()


def run_once(backbone: Backbone, model_cfg: ModelConfig, train: FeatureStore,
             target: FeatureStore, train_cfg: TrainConfig, eval_cfg: EvalConfig, seed: int,
             *, progress: bool | None = False) -> dict:
    """Train one seed and evaluate it zero-shot: the mean-over-categories metrics (fractions)
    plus ``train_s`` and ``eval_s`` (wall-clock seconds, machine-dependent)."""

    t0 = time.perf_counter()
    model = train_bayes_pfl(backbone, model_cfg, train, train_cfg, seed, eval_cfg=eval_cfg,
                            progress=progress)
    t1 = time.perf_counter()
    result = evaluate(model, target, dataclasses.replace(eval_cfg, seed=seed), progress=progress)
    t2 = time.perf_counter()
    row = {m: float(result.table.loc["mean", m]) for m in METRICS}
    return row | {"train_s": t1 - t0, "eval_s": t2 - t1}


def sweep(backbone: Backbone, base: ModelConfig, grid: Mapping[str, Sequence],
          train: FeatureStore, target: FeatureStore, train_cfg: TrainConfig,
          eval_cfg: EvalConfig, seeds: Sequence[int] = (0, 1, 2), *,
          progress: bool | None = False,
          runner: Callable[..., dict] | None = None) -> pd.DataFrame:
    """Figure A.2: every value of every field of ``grid`` (one at a time) x every seed.

    Args:
        base: the config the sweeps vary around (the paper's: B=3, K=10, P=Q=5).
        grid: ``{ModelConfig field: values}``, e.g. :data:`PAPER_GRIDS`.
        train, target: auxiliary training and zero-shot target features.
        runner: ``runner(backbone, model_cfg, train, target, train_cfg, eval_cfg, seed)`` ->
            dict of metrics (default :func:`run_once`); for tests and other methods.
    Returns:
        One row per (field, value, seed): ``param``, ``symbol``, ``value``, ``seed``, every
        metric of :data:`pfl.run.metrics.METRICS`, ``train_s``, ``eval_s``. Runs with the same
        config and seed (the base config of each sweep) are trained once and shared.
    """
    runner = runner or (lambda *a: run_once(*a, progress=progress))
    done: dict[tuple, dict] = {}
    rows = []
    for param, value, cfg in one_at_a_time(base, grid):
        for seed in seeds:
            key = (tuple(sorted(dataclasses.asdict(cfg).items())), seed)
            if key not in done:
                done[key] = runner(backbone, cfg, train, target, train_cfg, eval_cfg, seed)
            rows.append({"param": param, "symbol": SYMBOLS.get(param, param), "value": value,
                         "seed": seed, **done[key]})
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, metrics: Sequence[str] = ("pixel_pro", "image_ap"),
              by: Sequence[str] = ("param", "symbol", "value")) -> pd.DataFrame:
    """Mean, sample std (ddof=1; 0 for one seed) and seed count of ``metrics`` per group.

    Columns ``<metric>_mean``, ``<metric>_std``, ``n``; groups in first-seen order.

    >>> f = pd.DataFrame({"param": ["K"] * 3, "symbol": ["K"] * 3, "value": [1, 1, 5],
    ...                   "pixel_pro": [0.2, 0.4, 0.5], "image_ap": [0.5, 0.7, 0.9]})
    >>> s = summarise(f)
    >>> s[["value", "pixel_pro_mean", "pixel_pro_std", "n"]].round(4).values.tolist()
    [[1.0, 0.3, 0.1414, 2.0], [5.0, 0.5, 0.0, 1.0]]
    """
    by = list(by)
    g = frame.groupby(by, sort=False)
    out = g.size().rename("n").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1).fillna(0.0)
    cols = [c for m in metrics for c in (f"{m}_mean", f"{m}_std")] + ["n"]
    return out[cols].reset_index()


# --------------------------------------------------------------------------- Table A.2


def time_per_image(method, backbone: Backbone, dataset, rows: Sequence[int],
                   generator: torch.Generator | None = None, clock: str = "process") -> float:
    """Inference milliseconds per image: read, frozen tower and ``method.predict``, one image
    at a time (the paper's Table A.3 measure), after one warm-up image. Machine-dependent.

    ``clock``: ``"process"`` (default) CPU time of this process, which other jobs on a shared
    machine disturb less (with one BLAS thread it is the compute time); ``"wall"`` elapsed
    time, as the paper measures on its GPU.
    """
    clocks = {"process": time.process_time, "wall": time.perf_counter}
    if clock not in clocks:
        raise ValueError(f"clock must be one of {sorted(clocks)}, got {clock!r}")
    now = clocks[clock]

    gen = generator or torch.Generator().manual_seed(0)
    needs_images = bool(getattr(method, "needs_images", False))

    def one(i: int) -> None:
        b = _stack_samples([dataset[i]], backbone.image_size)
        feats = backbone.encode_image(b["image"])
        method.predict(Batch(cls_names=b["cls_name"], feats=feats,
                             images=b["image"] if needs_images else None), gen)

    rows = list(rows)
    if not rows:
        raise ValueError("time_per_image needs at least one row")
    with torch.no_grad():
        one(rows[0])
        t0 = now()
        for i in rows:
            one(i)
    return 1000.0 * (now() - t0) / len(rows)


def backbone_table(towers: Sequence[str], sizes: Sequence[int],
                   make_stores: Callable[[Backbone], tuple[FeatureStore, FeatureStore]],
                   model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig,
                   seeds: Sequence[int] = (0, 1), *, timing_images: int = 8,
                   backbone_factory: Callable[[str, int], Backbone] | None = None,
                   progress: bool | None = False) -> pd.DataFrame:
    """Table A.2: for every tower x input size x seed, train and evaluate zero-shot.

    Args:
        towers: open_clip config names (e.g. ``"pfl-tiny"``, ``"pfl-small"``).
        sizes: input sides; positional embeddings are resized to each.
        make_stores: ``backbone -> (train, target)`` features at that backbone's size.
        timing_images: images of the target store timed by :func:`time_per_image` (CPU
            time; seed ``seeds[0]`` only).
        backbone_factory: ``(tower, size) -> Backbone`` (default: random init with seed 0, or
            the shipped tiny weights; :func:`pfl.clip.backbone.resolve_weights`).
    Returns:
        One row per run: ``tower``, ``size``, ``seed``, ``pretrained`` (weights loaded),
        every metric, ``ms_per_image`` (NaN except for the first seed).
    """

    def default_factory(tower: str, size: int) -> Backbone:
        return Backbone.from_config(BackboneConfig(model_name=tower, image_size=size))

    factory = backbone_factory or default_factory
    rows = []
    for tower in towers:
        pretrained = resolve_weights(BackboneConfig(model_name=tower)) is not None
        for size in sizes:
            backbone = factory(tower, size)
            train, target = make_stores(backbone)
            for k, seed in enumerate(seeds):
                model = train_bayes_pfl(backbone, model_cfg, train, train_cfg, seed,
                                        eval_cfg=eval_cfg, progress=progress)
                result = evaluate(model, target, dataclasses.replace(eval_cfg, seed=seed),
                                  progress=progress)
                ms = float("nan")
                if k == 0 and timing_images and target.dataset is not None:
                    ms = time_per_image(model, backbone, target.dataset,
                                        target.indices[:timing_images])
                rows.append({"tower": tower, "size": size, "seed": seed,
                             "pretrained": pretrained,
                             **{m: float(result.table.loc["mean", m]) for m in METRICS},
                             "ms_per_image": ms})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- Figure A.4


def abnormal_text_embeddings(model, store: FeatureStore, draw_seed: int, *, bank: int = 0,
                             batch_size: int = 32) -> np.ndarray:
    """The abnormal text embedding ``Z^t_{b,r}`` of every image of ``store`` under one Monte
    Carlo draw (R = 1, bank prompt ``bank``): ``(N, E)``, unit norm, before RCA.

    Each image's noise comes from ``draw_seed`` and the image (:mod:`pfl.method.sampling`),
    so the result does not depend on ``batch_size`` or the order of the store.
    """
    if not 0 <= bank < model.cfg.n_prompts:
        raise ValueError(f"bank {bank} outside 0..{model.cfg.n_prompts - 1}")
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for batch in store.batches(batch_size):
            o = model.forward_features(batch.feats, batch.cls_names, seed=draw_seed,
                                       bank_index=bank, n_samples=1)
            out.append(o.text_features[:, bank, 0, 1].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def tsne_draws(draws: Sequence[np.ndarray], random_state: int = 0,
               perplexity: float | None = None) -> list[np.ndarray]:
    """Joint 2-D t-SNE (scikit-learn, PCA init, fixed ``random_state``) of several ``(N, E)``
    draws, split back into one ``(N, 2)`` array per draw (shared coordinates).

    ``perplexity`` default: ``min(30, (n_total - 1) / 3)`` (t-SNE needs it below n).
    """
    from sklearn.manifold import TSNE

    sizes = [len(d) for d in draws]
    x = np.concatenate([np.asarray(d, dtype=np.float64) for d in draws])
    if len(x) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(x)}")
    perplexity = perplexity or min(30.0, (len(x) - 1) / 3)
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state,
              max_iter=1000).fit_transform(x)
    return np.split(xy, np.cumsum(sizes)[:-1])
