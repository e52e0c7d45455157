"""The main job (README's first command, ``make demo`` = ``python -m pfl demo``).

On the active profile (``smoke`` by default: the tiny tower and the offline synthetic
benchmark, so it runs on a fresh clone with no download):

1. build the benchmark if it is missing (:func:`pfl.data.synthetic.ensure_benchmark`);
2. train Bayes-PFL on the auxiliary domain only (:func:`pfl.run.train.fit`);
3. evaluate it zero-shot on every target dataset (``target`` and ``medical``), next to the same
   model untrained, so that the tables show what training bought;
4. write the tables (appendix Tables A.4-A.9 layout, Markdown + CSV), the loss curves and one
   qualitative figure per category, and print where everything went.
"""

from __future__ import annotations

import time
from pathlib import Path

from pfl.clip.backbone import load_backbone
from pfl.config import Profile, active
from pfl.run.checkpoints import CHECKPOINT, RESUME, build_method
from pfl.run.evaluate import evaluate_profile, summary_frame, write_tables
from pfl.run.features import data_root, profile_store
from pfl.run.results import Results, Table
from pfl.run.train import History, fit
from pfl.utils import atomic_write_text, latest_point
from pfl.viz.plots import plot_loss_terms, save_figure

METHOD_LABEL = "Bayes-PFL"
UNTRAINED_LABEL = "Bayes-PFL (untrained)"


def epochs_done(run_dir: str | Path) -> int:
    """Epochs a run folder already holds, which :func:`pfl.run.train.fit` resumes from (0 for
    a new folder: fit starts afresh when there is no resume point)."""
    run_dir = Path(run_dir)
    if latest_point(run_dir / RESUME) is None:  # the resume points of pfl.run.train.fit
        return 0
    return len(History.load(run_dir).epochs)


def training_note(history: History, done_before: int) -> str:
    """What this call of fit did: trained, resumed, or only reused a finished checkpoint.

    >>> h = History(steps=[{"total": 0.5}] * 6, epochs=[{}] * 3)
    >>> training_note(h, 0)
    'trained 3 epochs (6 steps, final loss 0.5000)'
    >>> training_note(h, 1)
    'resumed after epoch 1: trained epochs 2-3 (final loss 0.5000)'
    >>> print(training_note(h, 3))
    reused the finished checkpoint (3 epochs, final loss 0.5000; delete the folder to retrain)
    """
    n = len(history.epochs)
    loss = f"final loss {history.steps[-1]['total']:.4f}" if history.steps else "no steps"
    if done_before >= n:
        return f"reused the finished checkpoint ({n} epochs, {loss}; delete the folder to retrain)"
    if done_before > 0:
        return f"resumed after epoch {done_before}: trained epochs {done_before + 1}-{n} ({loss})"
    return f"trained {n} epochs ({len(history.steps)} steps, {loss})"


def run(out: str | Path = "runs/demo", profile: Profile | None = None,
        progress: bool | None = None, compare_untrained: bool = True) -> dict:
    """Run the main job into ``out``; return the paths written and the summary table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    t0 = time.perf_counter()
    profile = profile or active()
    out = Path(out)
    print(f"pfl demo: profile {profile.name!r}, backbone {profile.backbone.model_name} at "
          f"{profile.backbone.image_size} px, output in {out}/", flush=True)

    backbone = load_backbone(profile.backbone)
    train = profile_store(profile, backbone, profile.data.aux, profile.data.aux_split,
                          progress=progress)
    print(f"[{time.perf_counter() - t0:5.0f} s] data: {data_root(profile.data.root)} "
          f"(aux {profile.data.aux!r}: {len(train)} images in {len(train.classes)} categories; "
          f"targets {list(profile.data.targets)})", flush=True)

    results = Results()
    if compare_untrained:
        untrained = build_method("bayes-pfl", profile, backbone)
        evaluate_profile(untrained, profile, None, method_name=UNTRAINED_LABEL,
                         results=results, figures=False, progress=progress)
        print(f"[{time.perf_counter() - t0:5.0f} s] evaluated the untrained model", flush=True)

    method = build_method("bayes-pfl", profile, backbone)
    done_before = epochs_done(out / "run")
    history = fit(method, train, profile.train, out / "run", profile=profile,
                  eval_cfg=profile.eval, progress=progress)
    print(f"[{time.perf_counter() - t0:5.0f} s] {training_note(history, done_before)}: "
          f"{out / 'run' / CHECKPOINT}", flush=True)
    fig = plot_loss_terms(history.steps_frame(), window=5)
    save_figure(fig, out / "figures" / "loss_terms.png", csv=history.steps_frame())
    plt.close(fig)

    evaluate_profile(method, profile, out, method_name=METHOD_LABEL, results=results,
                     progress=progress)
    written = write_tables(results, out)
    frac = summary_frame(results)
    summary = (100 * frac).round(1)
    flat = frac.copy()
    flat.index = [f"{m} / {d}" for m, d in frac.index]
    flat.index.name = "method / dataset"
    atomic_write_text(out / "summary.md", Table(flat, caption="zero-shot, mean over categories "
                                                "(%)").to_markdown())
    elapsed = time.perf_counter() - t0
    print(f"[{elapsed:5.0f} s] zero-shot results (mean over categories, %):", flush=True)
    print(summary.to_string())
    print("\nwritten:")
    print(f"  summary        {out / 'summary.md'}")
    print(f"  tables         {out / 'tables'}/  (<dataset>.md per metric; <dataset>_tableA4.md "
          "... A9 as the appendix)")
    print(f"  all values     {out / 'results.csv'}")
    print(f"  per image      {out / 'samples'}/")
    print(f"  figures        {out / 'figures'}/  (loss_terms.png, one map grid per category)")
    print(f"  checkpoint     {out / 'run'}/  (checkpoint.safetensors, config.json, epochs.csv)")
    print(f"done in {elapsed / 60:.1f} min")
    return {"out": out, "summary": summary, "tables": written, "history": history,
            "elapsed_s": elapsed}
