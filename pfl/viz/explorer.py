"""An ipywidgets explorer of anomaly maps: dataset, category, image, method, R, sigma, threshold.

Pick a dataset, a category and an image; see the image with its ground-truth outline (green) and
the predicted region at the threshold (red), the anomaly map and the thresholded map. The
sliders change the number of Monte Carlo samples R (Bayes-PFL only: the peers draw nothing), the
Gaussian smoothing sigma (given in pixels at 518 px and scaled to the image size, as
:mod:`pfl.run.evaluate` does; docs/reproduction.md, "Maps, scores and losses") and the decision
threshold; the image score and the per-image metrics (:func:`per_image_metrics`) update on every
change. A toggle switches between Bayes-PFL and the peer methods passed in.

The "uncertainty" checkbox (Bayes-PFL only; disabled for methods that draw no samples) adds a
panel with the per-pixel standard deviation over the R Monte Carlo prompt samples of the
slider, unsmoothed (sigma applies to the map only), and puts its mean and maximum into
:attr:`Explorer.numbers` as ``std_mean`` and ``std_max`` (absent otherwise). The std comes from
the same ``predict`` call as the map (:func:`pfl.run.postprocess.predict_with_std`, as ``pfl
predict --uncertainty`` and ``EvalConfig.uncertainty`` get it).

Predictions are cached per (method, dataset, image, R), the std beside the map once it is
asked for: moving sigma or the threshold only re-smooths and re-thresholds. Bayes-PFL draws
each image's noise from the evaluation's seed and the image's content (as
:mod:`pfl.run.evaluate` does), a peer from its own seed (``seed + row``), so the numbers do
not depend on the order of clicks.

The view is a ``widgets.Image`` holding PNG bytes rendered with a plain matplotlib
``Figure`` (no pyplot state), and the numbers are in :attr:`Explorer.numbers`; both can be
read and driven without a browser (tests/test_explorer.py)::

    ex = Explorer({"Bayes-PFL": model, "APRIL-GAN": peer}, {"target": store})
    ex.widget            # display it in a notebook
    ex.threshold.value = 0.6
    ex.numbers["pixel_f1"]
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch

from pfl.config import EvalConfig
from pfl.data.preprocess import denormalize
from pfl.run.features import FeatureStore
from pfl.run.postprocess import predict_with_std, scaled_sigma, smooth_maps


def per_image_metrics(anomaly_map: np.ndarray, mask: np.ndarray, score: float, label: int,
                      threshold: float) -> dict[str, float]:
    """What one image can tell: its score and decision, and its pixels against its mask.

    Args:
        anomaly_map: ``(H, W)`` smoothed abnormal probability.
        mask: ``(H, W)`` in {0, 1}.
        score: the image score; ``label``: 0 normal / 1 anomalous.
        threshold: a pixel (and the image) is called anomalous when its value is ``>=`` it.
    Returns:
        ``image_score``, ``label``, ``decision`` (0/1), ``correct`` (0/1), ``map_max``;
        ``pixel_auroc`` and ``pixel_ap`` (scikit-learn; NaN when the mask is all one class);
        at the threshold ``flagged`` (fraction of pixels called anomalous), ``precision``,
        ``recall``, ``pixel_f1`` and ``iou`` (NaN where undefined: e.g. recall of a normal
        image).

    >>> m = np.array([[0.9, 0.2], [0.6, 0.1]]); k = np.array([[1, 0], [1, 0]])
    >>> r = per_image_metrics(m, k, score=0.7, label=1, threshold=0.5)
    >>> r["pixel_auroc"], r["pixel_f1"], r["iou"], r["decision"], r["correct"]
    (1.0, 1.0, 1.0, 1, 1)
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    m = np.asarray(anomaly_map, dtype=np.float64).ravel()
    k = np.asarray(mask).ravel() > 0.5
    pred = m >= threshold
    tp, fp, fn = int((pred & k).sum()), int((pred & ~k).sum()), int((~pred & k).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    both = 0 < k.sum() < k.size
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    decision = int(score >= threshold)
    return {
        "image_score": float(score), "label": int(label), "decision": decision,
        "correct": int(decision == int(label)), "map_max": float(m.max()),
        "pixel_auroc": float(roc_auc_score(k, m)) if both else math.nan,
        "pixel_ap": float(average_precision_score(k, m)) if both else math.nan,
        "flagged": float(pred.mean()), "precision": precision, "recall": recall,
        "pixel_f1": ratio(2 * tp, 2 * tp + fp + fn) if k.any() else math.nan,
        "iou": ratio(tp, tp + fp + fn) if k.any() else math.nan,
    }


def _samples_r(method) -> bool:
    """Whether ``method`` draws Monte Carlo samples (Bayes-PFL's ``forward_features(...,
    n_samples=R)``); the peers are deterministic."""
    return hasattr(method, "forward_features") and hasattr(getattr(method, "cfg", None),
                                                            "mc_test")


class Explorer:
    """The widget (see the module docstring).

    Args:
        methods: ``{label: method}``, trained methods (the first is shown
            first; Bayes-PFL usually).
        stores: ``{dataset: FeatureStore}`` built with a dataset (to read the pixels back).
        eval_cfg: the starting sigma (``EvalConfig.sigma``) and the seed of the draws.
        r_max: the R slider's upper end.
        threshold: the starting decision threshold.
        dpi: of the rendered view.
    """

    def __init__(self, methods: Mapping[str, object], stores: Mapping[str, FeatureStore], *,
                 eval_cfg: EvalConfig | None = None, r_max: int = 10, threshold: float = 0.5,
                 dpi: int = 60):
        import ipywidgets as w

        if not methods:
            raise ValueError("Explorer needs at least one method")
        if not stores:
            raise ValueError("Explorer needs at least one dataset (a FeatureStore)")
        for name, store in stores.items():
            if getattr(store, "dataset", None) is None:
                raise ValueError(f"store {name!r} has no dataset to read images from; build it "
                                 "with pfl.run.features.extract(backbone, dataset)")
        self.methods, self.stores = dict(methods), dict(stores)
        self.eval_cfg = eval_cfg or EvalConfig()
        self.dpi = dpi
        # (method, dataset, row, R or None) -> (raw map, score, std over the R samples or None)
        self._cache: dict[tuple, tuple[np.ndarray, float, np.ndarray | None]] = {}
        self._images: dict[tuple, np.ndarray] = {}
        self.numbers: dict[str, float] = {}
        self._busy = False

        first = next(iter(self.methods.values()))
        r0 = int(getattr(getattr(first, "cfg", None), "mc_test", 1) or 1)
        style = {"description_width": "80px"}
        self.dataset = w.Dropdown(options=list(self.stores), description="dataset", style=style)
        self.category = w.Dropdown(description="category", style=style)
        self.image = w.Dropdown(description="image", style=style)
        self.method = w.ToggleButtons(options=list(self.methods), description="method",
                                      style=style)
        self.mc = w.IntSlider(value=min(max(1, r0), r_max), min=1, max=r_max,
                              description="R samples", style=style, continuous_update=False)
        self.sigma = w.FloatSlider(value=self.eval_cfg.sigma, min=0.0, max=16.0, step=0.5,
                                   description="σ @518px", style=style, continuous_update=False)
        self.threshold = w.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.01,
                                       description="threshold", style=style,
                                       continuous_update=False)
        self.uncertainty = w.Checkbox(value=False, description="uncertainty", indent=False)
        self.std: np.ndarray | None = None  # the std map shown, when it is
        self.view = w.Image(format="png")
        self.summary = w.HTML()
        self.widget = w.VBox([
            w.HBox([self.dataset, self.category, self.image]),
            w.HBox([self.method, self.uncertainty]),
            w.HBox([self.mc, self.sigma, self.threshold]), self.view, self.summary,
        ])
        self._fill_categories()
        self.dataset.observe(self._on_dataset, names="value")
        self.category.observe(self._on_category, names="value")
        for control in (self.image, self.method, self.mc, self.sigma, self.threshold,
                        self.uncertainty):
            control.observe(self.update, names="value")
        self.update()

    # --- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # --- choices -----------------------------------------------------------------------------
    @property
    def store(self) -> FeatureStore:
        return self.stores[self.dataset.value]

    def _fill_categories(self) -> None:
        self._busy = True
        self.category.options = self.store.classes
        self.category.value = self.store.classes[0]
        self._fill_images()
        self._busy = False

    def _fill_images(self) -> None:
        store = self.store
        rows = [i for i, c in enumerate(store.cls_names) if c == self.category.value]
        # Anomalous images first: they are the interesting ones.
        rows.sort(key=lambda i: (-int(store.labels[i]), i))
        labels = ["anomalous" if int(store.labels[i]) else "normal" for i in rows]
        busy, self._busy = self._busy, True
        self.image.options = [(f"{lab} · {store.paths[i].rsplit('/', 1)[-1]}", i)
                              for lab, i in zip(labels, rows)]
        self.image.value = rows[0]
        self._busy = busy

    def _on_dataset(self, change) -> None:
        self._fill_categories()
        self.update()

    def _on_category(self, change) -> None:
        if self._busy:
            return
        self._fill_images()
        self.update()

    # --- computation -------------------------------------------------------------------------
    def raw(self, method_name: str, dataset: str, row: int, r: int) -> tuple[np.ndarray, float]:
        """The unsmoothed map ``(S, S)`` and image score of one image (cached)."""
        return self._predicted(method_name, dataset, row, r, want_std=False)[:2]

    def raw_std(self, method_name: str, dataset: str, row: int, r: int) -> np.ndarray:
        """The per-pixel standard deviation ``(S, S)`` over the R samples of one image's map
        (cached beside the map); a ``ValueError`` for a method that draws no samples."""
        return self._predicted(method_name, dataset, row, r, want_std=True)[2]

    def _predicted(self, method_name: str, dataset: str, row: int, r: int, want_std: bool
                   ) -> tuple[np.ndarray, float, np.ndarray | None]:
        method = self.methods[method_name]
        samples = _samples_r(method)
        key = (method_name, dataset, row, r if samples else None)
        if key not in self._cache or (want_std and self._cache[key][2] is None):
            store = self.stores[dataset]
            needs = bool(getattr(method, "needs_images", False))
            batch = next(store.select([row]).batches(1, with_images=needs))
            # Bayes-PFL: the evaluation's draws (its seed and the image's content); a peer:
            # its own seed per image
            seed = self.eval_cfg.seed if samples else self.eval_cfg.seed + row
            if hasattr(method, "train"):
                method.train(False)
            with torch.no_grad():
                pred, std = predict_with_std(
                    method, batch, torch.Generator().manual_seed(seed), want_std,
                    option="the uncertainty panel", fix="pick Bayes-PFL for it",
                    **({"n_samples": r} if samples else {}))
            self._cache[key] = (pred.maps[0].float().cpu().numpy(), float(pred.scores[0]),
                                None if std is None else std[0])
        return self._cache[key]

    def _picture(self, dataset: str, row: int) -> np.ndarray:
        key = (dataset, row)
        if key not in self._images:

            store = self.stores[dataset]
            self._images[key] = denormalize(store.dataset[store.indices[row]]["image"])
        return self._images[key]

    def update(self, change=None) -> None:
        """Recompute the numbers and redraw the view for the current widget values."""
        if self._busy:
            return
        method = self.methods[self.method.value]
        self.mc.disabled = self.uncertainty.disabled = not _samples_r(method)
        store, row = self.store, int(self.image.value)
        with_std = bool(self.uncertainty.value) and not self.uncertainty.disabled
        amap, score, std = self._predicted(self.method.value, self.dataset.value, row,
                                           int(self.mc.value), want_std=with_std)
        self.std = std if with_std else None
        sigma = scaled_sigma(float(self.sigma.value), store.image_size)
        smooth = smooth_maps(amap[None], sigma)[0]
        mask = store.masks[row].numpy()
        label = int(store.labels[row])
        self.smoothed = smooth
        self.numbers = per_image_metrics(smooth, mask, score, label, float(self.threshold.value))
        if self.std is not None:
            self.numbers["std_mean"] = float(self.std.mean())
            self.numbers["std_max"] = float(self.std.max())
        self.summary.value = self._html()
        self.view.value = self._render(self._picture(self.dataset.value, row), mask, smooth)

    def _html(self) -> str:
        n = self.numbers

        def f(v: float) -> str:
            return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"

        verdict = "anomalous" if n["decision"] else "normal"
        truth = "anomalous" if n["label"] else "normal"
        rows = [
            ("image score", f(n["image_score"])),
            ("decision / truth", f"{verdict} / {truth}"),
            ("pixel AUROC / AP", f"{f(n['pixel_auroc'])} / {f(n['pixel_ap'])}"),
            ("F1 / IoU at threshold", f"{f(n['pixel_f1'])} / {f(n['iou'])}"),
            ("pixels flagged", f(n["flagged"])),
        ]
        if "std_mean" in n:
            rows.append(("std over R samples: mean / max",
                         f"{f(n['std_mean'])} / {f(n['std_max'])}"))
        cells = "".join(f"<tr><td>{a}</td><td><b>{b}</b></td></tr>" for a, b in rows)
        return f"<table>{cells}</table>"

    def _render(self, image: np.ndarray, mask: np.ndarray, smooth: np.ndarray) -> bytes:
        from matplotlib.figure import Figure

        t = float(self.threshold.value)
        std = self.std
        fig = Figure(figsize=(7.5, 2.6) if std is None else (10.0, 2.6))
        axes = fig.subplots(1, 3 if std is None else 4)
        axes[0].imshow(np.clip(image, 0, 1))
        if mask.any():
            axes[0].contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
        if (smooth >= t).any() and (smooth < t).any():
            axes[0].contour(smooth, levels=[t], colors="red", linewidths=0.8)
        axes[0].set_title("image, GT (green), ≥ threshold (red)", fontsize=7)
        im = axes[1].imshow(smooth, cmap="jet", vmin=0.0, vmax=1.0)
        axes[1].set_title(f"{self.method.value}: anomaly map", fontsize=7)
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        axes[2].imshow(smooth >= t, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"map ≥ {t:.2f}", fontsize=7)
        if std is not None:  # as pfl predict --uncertainty draws it: 0 to its maximum
            top = float(std.max()) if std.max() > 0 else 1.0
            im = axes[3].imshow(std, cmap="magma", vmin=0.0, vmax=top)
            axes[3].set_title(f"std over R = {int(self.mc.value)} samples", fontsize=7)
            fig.colorbar(im, ax=axes[3], fraction=0.046)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi, metadata={"Software": None})
        return buf.getvalue()
