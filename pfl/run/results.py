"""Result tables in the layout of the paper's per-category tables (appendix Tables A.4-A.9).

Two objects, one job each:

- :class:`Results`, the long-form store: one value per (method, dataset, category, metric,
  seed), values as fractions in [0, 1] (NaN where a metric is undefined). It round-trips
  through CSV exactly, so several runs and seeds can be collected and reported later.
- :class:`Table`, one wide table: rows = categories then ``mean`` (the mean over categories,
  taken per seed, then averaged over seeds), columns = methods (as in Tables A.4-A.9) or
  metrics. It prints percent with one decimal, as the paper does, ``mean ± std`` where there
  are several seeds (sample std over seeds), and saves as CSV (full precision) and Markdown.

    >>> r = Results()
    >>> for seed, v in ((0, 0.912), (1, 0.918)):
    ...     r.add("Bayes-PFL", "mvtec", "bottle", "image_auroc", v, seed=seed)
    ...     r.add("Bayes-PFL", "mvtec", "cable", "image_auroc", v - 0.1, seed=seed)
    >>> print(r.table("image_auroc", "mvtec"))
    category  Bayes-PFL
      bottle 91.5 ± 0.4
       cable 81.5 ± 0.4
        mean 86.5 ± 0.4
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pfl.run.metrics import METRICS

# Appendix table number -> metric name (pfl.run.metrics).
PAPER_TABLES = {
    "A.4": "pixel_auroc",
    "A.5": "image_auroc",
    "A.6": "pixel_ap",
    "A.7": "image_ap",
    "A.8": "pixel_pro",
    "A.9": "image_f1max",
}
METRIC_LABELS = {
    "image_auroc": "image-level AUROC",
    "image_ap": "image-level AP",
    "image_f1max": "image-level F1-max",
    "pixel_auroc": "pixel-level AUROC",
    "pixel_ap": "pixel-level AP",
    "pixel_f1max": "pixel-level F1-max",
    "pixel_pro": "pixel-level PRO",
}
COLUMNS = ("method", "dataset", "category", "metric", "value", "seed")
MEAN = "mean"  # the row holding the mean over categories
STD_SUFFIX = " std"  # CSV column of a table's std over seeds


def _percent(v: float, s: float | None, decimals: int) -> str:
    if math.isnan(v):
        return "-"
    text = f"{100 * v:.{decimals}f}"
    if s is not None and not math.isnan(s):
        text += f" ± {100 * s:.{decimals}f}"
    return text


@dataclass
class Table:
    """A per-category table; ``values`` and ``std`` hold fractions (print shows percent).

    Rows are categories then ``mean``; columns are methods or metrics.
    """

    values: pd.DataFrame
    std: pd.DataFrame | None = None  # sample std over seeds; NaN where one seed; None: no seeds
    caption: str = ""

    def formatted(self, decimals: int = 1) -> pd.DataFrame:
        """Strings in percent with ``decimals`` decimals; ``-`` for NaN; ``± std`` if seeds."""
        out = self.values.copy().astype(object)
        for r, c in np.ndindex(self.values.shape):
            s = None if self.std is None else float(self.std.iat[r, c])
            out.iat[r, c] = _percent(float(self.values.iat[r, c]), s, decimals)
        return out

    def to_string(self, decimals: int = 1) -> str:
        text = self.formatted(decimals).reset_index().to_string(index=False)
        return "\n".join(line.rstrip() for line in text.splitlines())

    def __str__(self) -> str:
        return self.to_string()

    def to_markdown(self, decimals: int = 1, bold_best: bool = False) -> str:
        """A pipe table; ``bold_best`` bolds each row's best printed value (methods columns)."""
        text = self.formatted(decimals)
        if bold_best:
            rounded = (100 * self.values).round(decimals)
            best = rounded.max(axis=1, skipna=True)
            for r, c in np.ndindex(text.shape):
                if rounded.iat[r, c] == best.iat[r]:
                    text.iat[r, c] = f"**{text.iat[r, c]}**"

        def row(cells):
            return "| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |"

        lines = [f"**{self.caption}**", ""] if self.caption else []
        lines.append(row([self.values.index.name or "category", *text.columns]))
        lines.append("|" + "---|" + "---:|" * len(text.columns))
        lines += [row([idx, *cells]) for idx, cells in zip(text.index, text.to_numpy())]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """Full-precision fractions; std columns carry the suffix ``" std"``."""
        frame = self.values
        if self.std is not None:
            frame = pd.concat([frame, self.std.add_suffix(STD_SUFFIX)], axis=1)
        frame = frame.rename_axis(self.values.index.name or "category")
        from pfl.utils import atomic_write  # here: pfl.utils imports torch, tables need not

        return atomic_write(path, lambda p: frame.to_csv(p, na_rep="nan"))

    @classmethod
    def from_csv(cls, path: str | Path, caption: str = "") -> Table:
        # read text, then parse floats: exact for the repr digits pandas wrote, and a category
        # called "nan" stays a name
        frame = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False).astype(float)
        std_cols = [c for c in frame.columns if c.endswith(STD_SUFFIX)]
        values = frame.drop(columns=std_cols)
        std = None
        if std_cols:
            std = frame[std_cols].rename(columns=lambda c: c[: -len(STD_SUFFIX)])
        return cls(values, std, caption)

    def save(self, stem: str | Path, bold_best: bool = False) -> tuple[Path, Path]:
        """Write ``stem.csv`` and ``stem.md``; return both paths."""
        from pfl.utils import atomic_write_text  # here: pfl.utils imports torch

        stem = Path(stem)
        csv = self.to_csv(stem.with_suffix(".csv"))
        md = atomic_write_text(stem.with_suffix(".md"), self.to_markdown(bold_best=bold_best))
        return csv, md


class Results:
    """Long-form store of metric values: (method, dataset, category, metric, value, seed)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str, str, int], float] = {}

    def __len__(self) -> int:
        return len(self._values)

    def add(
        self,
        method: str,
        dataset: str,
        category: str,
        metric: str,
        value: float,
        seed: int = 0,
        *,
        replace: bool = False,
    ) -> None:
        """Store one value, a fraction in [0, 1] or NaN (undefined)."""
        value = float(value)
        if not (math.isnan(value) or 0.0 <= value <= 1.0):
            raise ValueError(
                f"{method}/{dataset}/{category}/{metric}: value {value} outside [0, 1]; "
                "store fractions, not percent"
            )
        if category == MEAN:
            raise ValueError(f"category {MEAN!r} is computed by the tables; do not store it")
        key = (str(method), str(dataset), str(category), str(metric), int(seed))
        if key in self._values and not replace:
            raise ValueError(f"{key} already stored; pass replace=True to overwrite it")
        self._values[key] = value

    def add_metrics(self, table: pd.DataFrame, method: str, dataset: str, seed: int = 0) -> None:
        """Store every cell of a per-category table (:func:`pfl.run.metrics.evaluate_records`).

        The ``mean`` row is skipped: tables recompute it, per seed, from the categories.
        """
        for category, row in table.drop(index=MEAN, errors="ignore").iterrows():
            for metric, value in row.items():
                self.add(method, dataset, str(category), str(metric), value, seed)

    @property
    def frame(self) -> pd.DataFrame:
        """The long form, one row per value, columns :data:`COLUMNS`."""
        rows = [(*k[:4], v, k[4]) for k, v in self._values.items()]
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        return frame.astype({"value": float, "seed": int})

    def to_csv(self, path: str | Path) -> Path:
        from pfl.utils import atomic_write  # here: pfl.utils imports torch

        frame = self.frame
        return atomic_write(path, lambda p: frame.to_csv(p, index=False, na_rep="nan"))

    @classmethod
    def from_csv(cls, path: str | Path) -> Results:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = set(COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not a results CSV, columns {sorted(missing)} missing")
        out = cls()
        for rec in frame.itertuples(index=False):
            value, seed = float(rec.value), int(rec.seed)
            out.add(rec.method, rec.dataset, rec.category, rec.metric, value, seed)
        return out

    def _wide(self, frame: pd.DataFrame, column: str, order: Sequence[str], caption: str) -> Table:
        if frame.empty:
            raise ValueError(f"no stored values for {caption}")
        cells = frame.set_index(["seed", "category", column])["value"].unstack(column)
        per_seed = []
        for seed, g in cells.groupby(level="seed", sort=True):
            g = g.droplevel("seed")
            g.loc[MEAN] = g.mean(axis=0, skipna=True)
            per_seed.append(g.assign(seed=seed))
        stacked = pd.concat(per_seed).reset_index(names="category")
        grouped = stacked.drop(columns="seed").groupby("category", sort=False)
        categories = [*dict.fromkeys(frame["category"]), MEAN]
        values = grouped.mean().reindex(index=categories, columns=list(order))
        std = grouped.std(ddof=1).reindex(index=categories, columns=list(order))
        values.index.name = std.index.name = "category"
        values.columns.name = std.columns.name = None
        n_seeds = frame["seed"].nunique()
        caption += f", %, mean ± std over {n_seeds} seeds" if n_seeds > 1 else ", %"
        return Table(values, std if std.notna().any().any() else None, caption)

    def table(self, metric: str, dataset: str, methods: Sequence[str] | None = None) -> Table:
        """Categories x methods for one metric, as appendix Tables A.4-A.9."""
        f = self.frame
        f = f[(f["metric"] == metric) & (f["dataset"] == dataset)]
        methods = list(dict.fromkeys(f["method"])) if methods is None else list(methods)
        f = f[f["method"].isin(methods)]
        number = {m: n for n, m in PAPER_TABLES.items()}.get(metric)
        caption = f"{METRIC_LABELS.get(metric, metric)} on {dataset}"
        if number:
            caption = f"Table {number}-style: {caption}"
        return self._wide(f, "method", methods, caption)

    def paper_table(self, number: str, dataset: str, methods: Sequence[str] | None = None):
        """The table of appendix Table ``number`` ("A.4" ... "A.9") for ``dataset``."""
        if number not in PAPER_TABLES:
            raise ValueError(f"unknown table {number!r}; the paper has {sorted(PAPER_TABLES)}")
        return self.table(PAPER_TABLES[number], dataset, methods)

    def metrics_table(
        self, method: str, dataset: str, metrics: Sequence[str] | None = None
    ) -> Table:
        """Categories x metrics for one method."""
        f = self.frame
        f = f[(f["method"] == method) & (f["dataset"] == dataset)]
        if metrics is None:
            stored = set(f["metric"])
            metrics = [m for m in METRICS if m in stored] + sorted(stored - set(METRICS))
        f = f[f["metric"].isin(metrics)]
        return self._wide(f, "metric", metrics, f"{method} on {dataset}")
