"""Figures: functions that return a matplotlib ``Figure``, and ``save_figure`` to write them.

STYLE.md habit 8: figures come from functions; saving uses a fixed dpi and no timestamp or
software metadata, so the PNG bytes are stable; the CSV behind a figure sits beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from pfl.data.dataset import AnomalyDataset
from pfl.utils import atomic_write

__all__ = [
    "plot_domain_grid",
    "plot_method_maps",
    "save_figure",
    "plot_density_grid",
    "plot_warped_grids",
    "plot_sample_spread",
    "plot_anomaly_maps",
    "plot_prediction",
    "token_pca_rgb",
    "plot_token_pca",
    "plot_layer_maps",
    "plot_loss_terms",
    "plot_epoch_curves",
    "plot_metric_differences",
    "plot_sweep",
    "plot_tsne_draws",
    "plot_size_table",
]


def save_figure(fig, path: str | os.PathLike, csv=None, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG at ``path`` and, if given, ``csv`` (a DataFrame) beside it.

    Both files are written atomically; the CSV takes the PNG's name with ``.csv``.
    ``metadata={"Software": None}`` and a fixed ``dpi`` make the bytes repeatable.

    >>> import tempfile, pathlib, pandas as pd
    >>> fig, ax = plt.subplots(figsize=(2, 2)); _ = ax.plot([0, 1], [1, 0])
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = save_figure(fig, d / "x.png", csv=pd.DataFrame({"a": [1]}))
    >>> sorted(f.name for f in d.iterdir())
    ['x.csv', 'x.png']
    >>> plt.close(fig)
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG; give a path ending in .png, got {path}")
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    )
    if csv is not None:
        atomic_write(path.with_suffix(".csv"), lambda tmp: csv.to_csv(tmp, index=False))
    return path


def plot_density_grid(
    images: Sequence[Sequence[np.ndarray]],
    extent: tuple[float, float, float, float],
    row_titles: Sequence[str],
    col_titles: Sequence[str],
    cell: float = 1.7,
    cmap: str = "magma",
) -> plt.Figure:
    """A grid of 2-D densities: ``images[row][col]`` is an ``(ny, nx)`` array over ``extent``.

    Each panel is scaled to its own maximum (only shapes are compared). Row ``i``'s title goes
    on its first panel's y-axis, column titles on top.
    """
    n_rows, n_cols = len(images), len(images[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows), squeeze=False)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img, origin="lower", extent=extent, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def plot_warped_grids(
    transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    extent: tuple[float, float] = (-3.0, 3.0),
    n_lines: int = 21,
    n_points: int = 200,
    cell: float = 3.0,
) -> plt.Figure:
    """How 2-D maps bend a square grid: one panel per ``name -> f((M, 2)) -> (M, 2)``.

    Horizontal lines are drawn blue and vertical ones orange, so a fold (two parts of the
    plane landing on each other, a non-invertible map) shows as lines crossing.
    """
    lo, hi = extent
    ticks = np.linspace(lo, hi, n_lines)
    t = np.linspace(lo, hi, n_points)
    fig, axes = plt.subplots(1, len(transforms), figsize=(cell * len(transforms), cell))
    axes = np.atleast_1d(axes)
    for ax, (name, f) in zip(axes, transforms.items()):
        for c in ticks:
            h = f(np.stack([t, np.full_like(t, c)], axis=1))
            v = f(np.stack([np.full_like(t, c), t], axis=1))
            ax.plot(h[:, 0], h[:, 1], color="tab:blue", lw=0.6)
            ax.plot(v[:, 0], v[:, 1], color="tab:orange", lw=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    fig.tight_layout()
    return fig


def plot_sample_spread(sets: Mapping[str, np.ndarray], cell: float = 2.8) -> plt.Figure:
    """Spread of R samples ``(R, D)`` per named set: PCA scatter and the norms ``||z_r||``.

    One row per set; the PCA (scikit-learn) of each row is fitted on that row's samples.
    """
    from sklearn.decomposition import PCA

    fig, axes = plt.subplots(len(sets), 2, figsize=(2.2 * cell, cell * len(sets)), squeeze=False)
    for (name, samples), (a, b) in zip(sets.items(), axes):
        samples = np.asarray(samples, dtype=np.float64)
        pca = PCA(n_components=2).fit(samples)
        xy = pca.transform(samples)
        a.scatter(xy[:, 0], xy[:, 1], s=20)
        for r, (x, y) in enumerate(xy):
            a.annotate(str(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ev = pca.explained_variance_ratio_
        a.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=8)
        a.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=8)
        a.set_title(f"{name}: PCA of the samples", fontsize=9)
        b.bar(np.arange(len(samples)), np.linalg.norm(samples, axis=1))
        b.set_xlabel("sample r", fontsize=8)
        b.set_ylabel("||z_r||", fontsize=8)
        b.set_title(f"{name}: norms", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- training / evaluation


def plot_anomaly_maps(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    cell: float = 1.8,
    normalise: bool = True,
    suptitle: str | None = None,
) -> plt.Figure:
    """The paper's qualitative layout (appendix Figures A.10-A.34): top row the images
    ``(H, W, 3)`` in [0, 1] with the ground-truth outline in green, bottom row the anomaly maps.

    ``normalise``: maps are min-max scaled over all panels of the figure (one colour scale);
    else shown on [0, 1]. ``titles`` longer than a panel are shortened in the middle, and
    ``suptitle`` gets its own room above them, so no text overlaps.
    """
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(cell * n, 2 * cell), squeeze=False)
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
    lo, hi = (float(stack.min()), float(stack.max())) if normalise else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    for j in range(n):
        top, bottom = axes[0, j], axes[1, j]
        top.imshow(np.clip(images[j], 0, 1))
        mask = np.asarray(masks[j], dtype=np.float32)
        if mask.any():
            top.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        bottom.imshow(stack[j], cmap="jet", vmin=lo, vmax=hi)
        if titles is not None:
            top.set_title(_short(titles[j], max(8, int(cell * 10))), fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image + GT", fontsize=8)
    axes[1, 0].set_ylabel("anomaly map", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2 * cell)))
    else:
        fig.tight_layout()
    return fig


def plot_prediction(blended, score: float, threshold: float | None = None, title: str = "",
                    std_map: np.ndarray | None = None, cmap: str = "jet",
                    height: float = 3.2) -> plt.Figure:
    """One image of ``pfl predict``: ``blended`` (the image with its anomaly map over it in
    ``cmap``, values 0-1; a PIL image or ``(H, W, 3)`` array), a colour bar of that 0-1 scale,
    and a title with ``title``, the image score and, with ``threshold``, the verdict.

    ``std_map`` (any size): a second panel with the per-pixel standard deviation over the Monte
    Carlo prompt samples, on its own colour bar (0 to its maximum).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    img = np.asarray(blended)
    aspect = img.shape[1] / img.shape[0]
    # Fixed layout (inches), no tight_layout: it is cheap, and it is the same for every image.
    w = min(height * aspect, 8.0)
    h = w / aspect
    panels = 1 if std_map is None else 2
    fig_w, fig_h = panels * (w + 1.05) + 0.1, h + 0.6
    fig = plt.figure(figsize=(fig_w, fig_h))

    def panel(k):
        x0 = 0.1 + k * (w + 1.05)
        ax = fig.add_axes((x0 / fig_w, 0.1 / fig_h, w / fig_w, h / fig_h))
        cax = fig.add_axes(((x0 + w + 0.08) / fig_w, 0.1 / fig_h, 0.12 / fig_w, h / fig_h))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax, cax

    ax, cax = panel(0)
    ax.imshow(img)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax, label="abnormal probability")
    verdict = ""
    if threshold is not None:
        verdict = (f" \u2265 {threshold:.2f}: anomalous" if score >= threshold
                   else f" < {threshold:.2f}: normal")
    chars = max(12, int((w + 0.9) * 13))
    ax.set_title(f"{_short(title, chars)}\nscore {score:.3f}{verdict}", fontsize=8)
    if std_map is not None:
        sd = np.asarray(std_map, dtype=np.float64)
        top = float(sd.max()) if sd.max() > 0 else 1.0
        ax2, cax2 = panel(1)
        im = ax2.imshow(sd, cmap="magma", vmin=0, vmax=top,
                        extent=(0, img.shape[1], img.shape[0], 0))
        fig.colorbar(im, cax=cax2, label="std over R samples")
        ax2.set_title(f"uncertainty\nmean std {sd.mean():.3f}", fontsize=8)
    return fig


def _short(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters with an ellipsis in the middle.

    >>> _short("a_very_long_file_name.png", 12)
    'a_very\u2026e.png'
    """
    return text if len(text) <= n else text[: (n - 1) // 2 + (n - 1) % 2] + "\u2026" + \
        text[len(text) - (n - 1) // 2:]


# --------------------------------------------------------------------------- CLIP features (01)


def token_pca_rgb(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Patch tokens (T, W) -> (gh, gw, 3) image: their first three principal components,
    each min-max scaled to [0, 1] (scikit-learn PCA; the sign of a component is arbitrary).

    >>> token_pca_rgb(np.random.default_rng(0).normal(size=(16, 8)), (4, 4)).shape
    (4, 4, 3)
    """
    from sklearn.decomposition import PCA

    comps = PCA(n_components=3, svd_solver="full").fit_transform(np.asarray(tokens, np.float64))
    lo, hi = comps.min(0), comps.max(0)
    rgb = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return rgb.reshape(grid[0], grid[1], 3)


def plot_token_pca(
    images: Sequence[np.ndarray],
    patches: np.ndarray,
    grid: tuple[int, int],
    layers: Sequence[int],
    names: Sequence[str],
    cell: float = 1.7,
) -> plt.Figure:
    """Rows: images; columns: the image, then the PCA-to-RGB of its patch tokens per layer.

    patches: (N, L, T, W) as :class:`pfl.clip.backbone.ImageFeatures` gives them.
    """
    n, n_layers = patches.shape[:2]
    fig, axes = plt.subplots(n, n_layers + 1, figsize=(cell * (n_layers + 1), cell * n),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(np.clip(images[i], 0, 1))
        axes[i, 0].set_ylabel(names[i], fontsize=8)
        for k in range(n_layers):
            axes[i, k + 1].imshow(token_pca_rgb(patches[i, k], grid), interpolation="nearest")
            if i == 0:
                axes[i, k + 1].set_title(f"block {layers[k]}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_layer_maps(
    image: np.ndarray, mask: np.ndarray, maps: np.ndarray, layers: Sequence[int],
    cell: float = 1.9,
) -> plt.Figure:
    """One image with its ground-truth outline, then one map per tapped layer and their mean.

    maps: (L, H, W) abnormal probabilities on a shared [0, 1] colour scale.
    """
    panels = [*maps, maps.mean(0)]
    titles = [f"block {b}" for b in layers] + ["mean"]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(cell * (len(panels) + 1), cell))
    axes[0].imshow(np.clip(image, 0, 1))
    if np.asarray(mask).any():
        axes[0].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0].set_title("image + GT", fontsize=8)
    for ax, m, t in zip(axes[1:], panels, titles):
        im = ax.imshow(m, cmap="jet", vmin=0, vmax=1)
        ax.set_title(t, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.tolist(), fraction=0.02)
    return fig


def plot_loss_terms(steps, terms: Sequence[str] | None = None, cell: float = 2.2,
                    window: int = 1) -> plt.Figure:
    """Every loss term per optimiser step, one panel each (a ``History.steps_frame()``).

    ``window > 1`` overlays a centred running mean of that many steps.
    """
    skip = {"epoch", "step", "lr"}
    terms = list(terms or [c for c in steps.columns if c not in skip])
    n_cols = min(4, len(terms))
    n_rows = -(-len(terms) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, 0.8 * cell * n_rows),
                             squeeze=False)
    for ax, term in zip(axes.flat, terms):
        y = steps[term].to_numpy(dtype=float)
        ax.plot(steps["step"], y, lw=0.8, alpha=0.5 if window > 1 else 1.0)
        if window > 1:
            ax.plot(steps["step"], steps[term].rolling(window, center=True, min_periods=1).mean(),
                    lw=1.2, color="tab:red")
        ax.set_title(term, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return fig


def plot_epoch_curves(epochs, datasets: Sequence[str], metric: str = "pixel_ap",
                      cell: float = 3.0) -> plt.Figure:
    """Appendix Figure A.3's question: loss (left) and ``metric`` (right) per epoch for each
    monitored dataset (columns ``<name>/loss`` and ``<name>/<metric>`` of
    ``History.epochs_frame()``); the left panel also shows the training loss."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(2 * cell, cell))
    x = epochs["epoch"]
    a.plot(x, epochs["train_loss"], "k--", marker=".", label="train (mean of the epoch's steps)")
    for name in datasets:
        a.plot(x, epochs[f"{name}/loss"], marker="o", label=name)
        b.plot(x, epochs[f"{name}/{metric}"], marker="o", label=name)
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    b.set_xlabel("epoch")
    b.set_ylabel(metric)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_metric_differences(diff, std=None, title: str = "", cell: float = 3.4) -> plt.Figure:
    """Appendix Figure A.1's layout: grouped bars of a metric difference (e.g. flow minus
    Gaussian, in points), rows of ``diff`` = datasets, columns = metrics; image-level metrics
    in the left panel, pixel-level in the right. ``std``: error bars, same shape."""
    groups = [[c for c in diff.columns if c.startswith("image")],
              [c for c in diff.columns if c.startswith("pixel")]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(cell * len(groups), cell), squeeze=False)
    for ax, cols in zip(axes[0], groups):
        x = np.arange(len(diff.index))
        width = 0.8 / len(cols)
        for k, c in enumerate(cols):
            err = None if std is None else std[c].to_numpy(dtype=float)
            ax.bar(x + (k - (len(cols) - 1) / 2) * width, diff[c].to_numpy(dtype=float), width,
                   yerr=err, capsize=2, label=c)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(diff.index, fontsize=8)
        ax.set_ylabel("difference (points)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- ablations (08)


def plot_sweep(summary, metrics: tuple[str, str] = ("pixel_pro", "image_ap"),
               cell: float = 2.6) -> plt.Figure:
    """Appendix Figure A.2's layout: one panel per swept parameter, ``metrics[0]`` (pixel PRO)
    on the left axis and ``metrics[1]`` (image AP) on the right axis, per value.

    ``summary``: :func:`pfl.viz.ablations.summarise` output (``symbol``, ``value``,
    ``<metric>_mean``, ``<metric>_std``, ``n``); the band is mean ± one std over seeds.
    """
    symbols = list(dict.fromkeys(summary["symbol"]))
    fig, axes = plt.subplots(1, len(symbols), figsize=(cell * len(symbols), 0.85 * cell),
                             squeeze=False)
    colours = ("tab:blue", "tab:orange")
    for k, (ax, sym) in enumerate(zip(axes[0], symbols)):
        part = summary[summary["symbol"] == sym].sort_values("value")
        x = part["value"].to_numpy(dtype=float)
        twin = ax.twinx()
        for a, metric, colour in zip((ax, twin), metrics, colours):
            mean = part[f"{metric}_mean"].to_numpy(dtype=float)
            std = part[f"{metric}_std"].to_numpy(dtype=float)
            a.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
            a.plot(x, mean, marker="o", ms=3, color=colour, label=metric)
            a.tick_params(axis="y", labelsize=7, colors=colour)
        ax.set_xticks(x)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(sym, fontsize=9)
        ax.set_title(f"({chr(97 + k)}) {sym}, n={int(part['n'].min())} seeds", fontsize=8)
        if k == 0:
            ax.set_ylabel(metrics[0], fontsize=8, color=colours[0])
        if k == len(symbols) - 1:
            twin.set_ylabel(metrics[1], fontsize=8, color=colours[1])
    fig.tight_layout()
    return fig


def plot_tsne_draws(coords: Sequence[np.ndarray], categories: Sequence[str],
                    titles: Sequence[str] | None = None, cell: float = 3.2) -> plt.Figure:
    """Appendix Figure A.4's layout: side-by-side 2-D embeddings ``(N, 2)`` of the same N
    images under different Monte Carlo draws, one colour per category, shared axis limits."""
    cats = sorted(set(categories))
    colours = plt.get_cmap("tab10")
    names = np.asarray(categories)
    allxy = np.concatenate(coords)
    pad = 0.05 * (allxy.max(0) - allxy.min(0))
    lo, hi = allxy.min(0) - pad, allxy.max(0) + pad
    fig, axes = plt.subplots(1, len(coords), figsize=(cell * len(coords) + 1.2, cell),
                             squeeze=False)
    for k, (ax, xy) in enumerate(zip(axes[0], coords)):
        for j, c in enumerate(cats):
            sel = names == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=colours(j % 10), label=c)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[k] if titles else f"({chr(97 + k)}) draw {k + 1}", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def plot_size_table(frame, metrics: Sequence[str] = ("image_auroc", "image_ap", "pixel_auroc",
                                                     "pixel_ap"), cell: float = 2.2
                    ) -> plt.Figure:
    """Table A.2 as curves: each metric against the input size, one line per tower, mean ±
    one std over seeds (``frame``: :func:`pfl.viz.ablations.backbone_table` rows)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(cell * len(metrics), 0.9 * cell),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for tower in dict.fromkeys(frame["tower"]):
            g = frame[frame["tower"] == tower].groupby("size")[metric]
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            ax.errorbar(mean.index, mean.to_numpy(), yerr=std.to_numpy(), marker="o", ms=3,
                        capsize=2, label=tower)
        ax.set_title(metric, fontsize=8)
        ax.set_xticks(sorted(set(frame["size"])))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("input size (px)", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_domain_grid(root: str | os.PathLike, domains: Mapping[str, Sequence], n_normal: int = 2,
                     n_bad: int = 3, px: int = 72) -> plt.Figure:
    """One column per category of a benchmark tree (``root/<domain>/meta.json``): ``n_normal``
    good test images over ``n_bad`` defective ones with the mask outlined in red.

    ``domains`` maps a domain folder to its categories (objects with a ``.name``), as
    :data:`pfl.data.synthetic.DOMAINS` does; notebook 00 draws the synthetic benchmark with it.
    """
    root = Path(root)
    cols = [(d, c.name) for d, cats in domains.items() for c in cats]
    fig, axes = plt.subplots(n_normal + n_bad, len(cols), figsize=(len(cols) * 0.8, 4.1))
    for j, (d, cls) in enumerate(cols):
        ds = AnomalyDataset(root / d, classes=[cls])
        normal = [i for i, y in enumerate(ds.labels) if y == 0][:n_normal]
        bad = [i for i, y in enumerate(ds.labels) if y == 1]
        bad = bad[(j % 2) * n_bad:(j % 2 + 1) * n_bad]
        for r, i in enumerate(normal + bad):
            s = ds.samples[i]
            ax = axes[r, j]
            ax.imshow(Image.open(root / d / s["img_path"]).resize((px, px)))
            if s["mask_path"]:
                m = np.asarray(Image.open(root / d / s["mask_path"]).resize((px, px))) > 127
                ax.contour(m, [0.5], colors="red", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{cls}\n({d})", fontsize=6)
            if j == 0:
                ax.set_ylabel("good" if r < n_normal else "defect", fontsize=7)
    fig.subplots_adjust(wspace=0.04, hspace=0.04, left=0.02, right=0.99, top=0.9, bottom=0.01)
    return fig


def plot_method_maps(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     rows: Mapping[str, Sequence[np.ndarray]], titles: Sequence[str],
                     cell: float = 1.7) -> plt.Figure:
    """Methods side by side (notebook 07). Top row: the images ``(H, W, 3)`` in [0, 1] with the
    mask outline; then one row of maps per method (``rows``: name -> one map per image), one
    colour scale per row (its min to max), so each method's own ranking is what shows."""
    fig, axes = plt.subplots(1 + len(rows), len(images),
                             figsize=(cell * len(images), cell * (1 + len(rows))), squeeze=False)
    for j, (img, mask) in enumerate(zip(images, masks)):
        axes[0, j].imshow(np.clip(img, 0, 1))
        axes[0, j].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        axes[0, j].set_title(titles[j], fontsize=8)
    for i, (name, maps) in enumerate(rows.items(), start=1):
        lo, hi = float(np.min(maps)), float(np.max(maps))
        for j, m in enumerate(maps):
            axes[i, j].imshow(m, cmap="jet", vmin=lo, vmax=max(hi, lo + 1e-12))
        axes[i, 0].set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
