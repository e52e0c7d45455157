"""Auxiliary training of any method: optimiser, schedule, selection, resume.

Appendix A.1: the new modules train on the auxiliary dataset only (VisA for every target,
MVTec-AD when the target is VisA) with Adam, lr 1e-4, batch 32, 20 epochs; R = 1 and one
random bank index per step (both are the method's business, in ``training_step``).

Named options where the authors' code differs (docs/authors-code.md):

- ``TrainConfig.optimizer = "paper"`` (default): one Adam group at ``cfg.lr``, betas
  (0.9, 0.999), constant lr. ``"official"``: the code's per-group lrs (:data:`OFFICIAL_LRS`:
  prompts 1e-3, temperatures 1e-2, flows 1e-3, the rest 1e-4; groups from the method's
  ``parameter_groups()`` hook, else one group at ``cfg.lr``), betas (0.5, 0.999) and a cosine
  schedule after a linear warm-up over the first 10 % of the steps.
- ``TrainConfig.selection = "last"`` (default): the last epoch. ``"holdout"``: hold out
  ``holdout_classes`` auxiliary categories (drawn with ``cfg.seed``), never train on them, and
  keep the epoch with the best mean ``selection_metric`` on them. ``"official_target"``: the
  authors' choice, the best epoch on the first 5 categories of the *target* dataset. That is
  target leakage: the zero-shot numbers it gives are not zero-shot; it exists only to compare
  with published numbers, and needs ``target=`` passed explicitly.

Run folder (``out_dir``): ``config.json`` (method name, the configs) from the start;
``resume/<generation>/`` after every epoch, the resume point: ``trainable.safetensors``,
``state.pt`` (optimiser and scheduler state, epochs done, best value so far),
``history.json`` and, with a selection, ``best.safetensors`` (the best epoch's state). A point
is written whole into a hidden folder and published with one atomic rename
(:func:`pfl.utils.write_point`), so the weights and the state beside them always come from the
same epoch, and the previous point stays until the next one is published. When the last
epoch is done, the final outputs follow from the last point: ``history.json``, ``steps.csv``,
``epochs.csv``, and last ``checkpoint.safetensors`` (the selected trainable state only; CLIP is
loaded apart), so a folder with a checkpoint holds the whole set, all of one epoch; a kill
while they are written leaves a subset, rewritten by the next call. While a run is
unfinished, :meth:`History.load` reads its progress from the point.

Every random draw of an epoch comes from generators seeded by ``(cfg.seed, epoch)``, so there
is no RNG stream to carry over: a run killed at any instant and resumed ends bit-identical to
an uninterrupted one on CPU (tests/test_resume.py kills it between every two disk writes).
Leftovers of killed writes are removed when a run starts. Run folders of older pfl versions
(``resume/state.pt`` and ``resume/trainable.safetensors`` replaced one after the other) are
converted on resume, unless their weights are newer than their state (a torn write, which
would train an epoch twice): then fit stops and says how to start over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pfl.clip.backbone import load_backbone
from pfl.config import EvalConfig, Profile, TrainConfig
from pfl.method.contract import Batch, Method
from pfl.method.diagnostics import posterior_diagnostics
from pfl.method.model import BayesPFL
from pfl.method.official import SELECTION_CLASSES
from pfl.run import distributed
from pfl.run.checkpoints import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    RESUME,
    build_method,
    read_run_config,
    set_mode,
)
from pfl.run.evaluate import evaluate
from pfl.run.features import FeatureStore, profile_store, progress_enabled
from pfl.utils import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    discard,
    latest_point,
    remove_stale,
    write_point,
)

OPTIMIZERS = ("paper", "official")
SELECTIONS = ("last", "holdout", "official_target")
OFFICIAL_LRS = {"prompts": 1e-3, "temperatures": 1e-2, "flows": 1e-3, "rest": 1e-4}
OFFICIAL_BETAS = (0.5, 0.999)
WARMUP_FRACTION = 0.1  # of all steps, for the "official" cosine schedule
OFFICIAL_TARGET_CLASSES = 5  # the authors select their checkpoint on 5 target categories



class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or inf loss; the last good checkpoint is kept."""


@dataclass
class History:
    """What a run did: one row per optimiser step and one per epoch.

    steps: ``{"epoch", "step", "lr", "total", <every loss term>}`` (epoch 1-based), and
    ``"post/<key>"`` on the steps :func:`fit`'s ``diagnostics_every`` tracks.
    epochs: ``{"epoch", "train_loss", <"select/..." holdout metrics>,
    <"<name>/loss", "<name>/<metric>" for every monitored dataset>}``.
    """

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    selection: str = "last"
    best_epoch: int | None = None
    holdout: list[str] = field(default_factory=list)  # categories held out ("holdout")
    out_dir: str | None = None

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.steps)

    def epochs_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.epochs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> History:
        return cls(**d)

    def save(self, out_dir: str | Path) -> None:
        """``history.json``, ``steps.csv``, ``epochs.csv`` in ``out_dir`` (atomically)."""
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / HISTORY, self.to_dict())
        atomic_write_text(out_dir / "steps.csv", self.steps_frame().to_csv(index=False))
        atomic_write_text(out_dir / "epochs.csv", self.epochs_frame().to_csv(index=False))

    @classmethod
    def load(cls, out_dir: str | Path) -> History:
        """The history of a run folder: the final one, or for an unfinished run the last
        completed epoch's (from its resume point)."""
        out_dir = Path(out_dir)
        path = out_dir / HISTORY
        if not (out_dir / CHECKPOINT).is_file():
            point = latest_point(out_dir / RESUME)
            path = point / HISTORY if point is not None else path
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir} holds no history: pass a run folder written by "
                                    "pfl.run.train.fit")
        return cls.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------- optimiser


def _param_groups(method: Method) -> dict[str, list[torch.nn.Parameter]] | None:
    hook = getattr(method, "parameter_groups", None) or getattr(method, "param_groups", None)
    return hook() if callable(hook) else None


def build_optimizer(method: Method, cfg: TrainConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam per ``cfg.optimizer`` (module docstring) and its schedule (None: constant lr)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got "
                         f"{cfg.optimizer!r}")
    params = [p for p in method.trainable_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {method.name!r} has no trainable parameters")
    if cfg.optimizer == "paper":
        return torch.optim.Adam(params, lr=cfg.lr), None
    groups = _param_groups(method)
    if groups:
        named = [{"params": [p for p in ps if p.requires_grad], "name": name,
                  "lr": OFFICIAL_LRS.get(name, OFFICIAL_LRS["rest"])}
                 for name, ps in groups.items()]
        named = [g for g in named if g["params"]]
        grouped = {id(p) for g in named for p in g["params"]}
        if grouped != {id(p) for p in params}:
            raise ValueError(f"{method.name}.parameter_groups() does not cover exactly its "
                             "trainable parameters")
    else:
        named = [{"params": params, "name": "all", "lr": cfg.lr}]
    opt = torch.optim.Adam(named, betas=OFFICIAL_BETAS)
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- helpers


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The generator of one stream of one epoch: independent of what ran before it."""
    mixed = np.random.SeedSequence([seed % 2**32, epoch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def _state_tensors(method: Method) -> dict[str, torch.Tensor]:
    # Clone: safetensors refuses tensors that share storage (e.g. one encoder in two flows).
    return {k: v.detach().cpu().clone().contiguous()
            for k, v in method.trainable_state_dict().items()}


def _write_state(path: Path, method: Method) -> None:
    tensors = _state_tensors(method)
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"method": method.name}))


def _needs_images(method: Method) -> bool:
    return bool(getattr(method, "needs_images", False))


def steps_per_epoch(n_samples: int, cfg: TrainConfig) -> int:
    """Optimiser steps in one epoch: ceil(n / batch), capped by ``max_steps_per_epoch``."""
    n = math.ceil(n_samples / cfg.batch_size)
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def holdout_split(classes: Sequence[str], k: int, seed: int) -> list[str]:
    """The ``k`` auxiliary categories held out for selection, drawn with ``seed`` (sorted).

    >>> holdout_split(["a", "b", "c", "d"], 2, seed=0) == holdout_split(["d", "c", "b", "a"], 2, 0)
    True
    """
    classes = sorted(classes)
    if not 0 < k < len(classes):
        raise ValueError(f"holdout_classes must be in 1..{len(classes) - 1} for "
                         f"{len(classes)} auxiliary categories, got {k}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(classes, size=k, replace=False).tolist())


def official_selection_classes(classes: Sequence[str]) -> list[str]:
    """The authors' selection categories of the target (MVTec-AD: bottle, hazelnut, wood,
    zipper, leather; VisA: chewinggum, cashew, pipe_fryum, capsules, candle) when the target
    has them all, else its first 5 (sorted)."""
    for names in SELECTION_CLASSES.values():
        if set(names) <= set(classes):
            return list(names)
    return sorted(classes)[:OFFICIAL_TARGET_CLASSES]


def diagnostics_batch(store: FeatureStore, n_images: int) -> Batch:
    """The fixed images :func:`fit`'s posterior diagnostics look at: ``n_images`` rows spread
    evenly over ``store`` (its first and last row included), in store order."""
    if n_images < 1:
        raise ValueError(f"diagnostics_images must be >= 1, got {n_images}")
    n = min(n_images, len(store))
    rows = sorted({round(i * (len(store) - 1) / max(n - 1, 1)) for i in range(n)})
    return next(iter(store.select(rows).batches(len(rows))))


def store_loss(method: Method, store: FeatureStore, batch_size: int,
               generator: torch.Generator) -> float:
    """Mean training loss (``training_step(...).total``, no gradients) over ``store``."""
    set_mode(method, True)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in store.batches(batch_size, with_images=_needs_images(method)):
            total += float(method.training_step(batch, generator).total) * len(batch)
            n += len(batch)
    return total / max(n, 1)


def _epoch_metrics(method: Method, store: FeatureStore, eval_cfg: EvalConfig,
                   prefix: str) -> dict[str, float]:

    result = evaluate(method, store, eval_cfg, name=prefix, progress=False)
    return {f"{prefix}/{k}": float(v) for k, v in result.table.loc["mean"].items()}


def _monitor_row(method: Method, monitor: Mapping[str, FeatureStore], cfg: TrainConfig,
                 eval_cfg: EvalConfig, epoch: int, row: dict) -> dict:
    """``row`` plus loss and metrics of every monitored dataset after ``epoch`` epochs."""
    for k, (name, store) in enumerate(sorted(monitor.items())):
        row[f"{name}/loss"] = store_loss(method, store, cfg.batch_size,
                                         _generator(cfg.seed, epoch, 2 + k))
        row |= _epoch_metrics(method, store, eval_cfg, name)
    return row


def _selection_value(row: Mapping, prefix: str, metric: str) -> float:
    value = row.get(f"{prefix}/{metric}", math.nan)
    if math.isnan(value):  # e.g. image-label data: fall back to image AUROC
        value = row.get(f"{prefix}/image_auroc", math.nan)
    return value


# --------------------------------------------------------------------------- resume point

TRAINABLE, STATE, BEST = "trainable.safetensors", "state.pt", "best.safetensors"
OUTPUTS = (CHECKPOINT, HISTORY, "steps.csv", "epochs.csv")  # the final outputs, besides config


@dataclass
class ResumeState:
    """What one epoch hands to the next, besides the trainable, optimiser and schedule state."""

    epoch: int  # epochs completed
    history: History
    best_value: float = -math.inf  # best selection metric so far (selection != "last")
    best_state: dict[str, torch.Tensor] | None = None  # trainable state of that best epoch


def save_resume_point(out_dir: str | Path, method: Method, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler | None,
                      state: ResumeState) -> Path:
    """Publish the resume point after ``state.epoch`` epochs as one atomic unit; -> its folder.

    All files (module docstring) go through :func:`pfl.utils.write_point`: written into a
    hidden folder, then one rename. Only one process may write a run folder (with
    DistributedDataParallel: rank 0, after the step's gradients are reduced).
    """
    meta = {"method": method.name, "epoch": str(state.epoch)}
    tensors = _state_tensors(method)
    trainer = {"optimizer": opt.state_dict(), "epoch": state.epoch,
               "scheduler": sched.state_dict() if sched is not None else {},
               "best_value": state.best_value}
    history = json.dumps(state.history.to_dict(), indent=2) + "\n"  # key order: the csv columns
    files = {TRAINABLE: lambda p: save_file(tensors, p, metadata=meta),
             STATE: lambda p: torch.save(trainer, p),
             HISTORY: lambda p: Path(p).write_text(history)}
    if state.best_state is not None:
        best, best_meta = state.best_state, {**meta, "epoch": str(state.history.best_epoch)}
        files[BEST] = lambda p: save_file(best, p, metadata=best_meta)
    return write_point(Path(out_dir) / RESUME, files)


def load_resume_point(point: str | Path, method: Method, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler | None) -> ResumeState:
    """Load a point of :func:`save_resume_point` into ``method``, ``opt`` and ``sched``.

    Reads only: every process of a distributed run may call it."""
    point = Path(point)
    trainer = torch.load(point / STATE, weights_only=True)
    method.load_trainable_state_dict(load_file(str(point / TRAINABLE)))
    opt.load_state_dict(trainer["optimizer"])
    if sched is not None:
        sched.load_state_dict(trainer["scheduler"])
    history = History.from_dict(json.loads((point / HISTORY).read_text()))
    best = load_file(str(point / BEST)) if (point / BEST).is_file() else None
    return ResumeState(int(trainer["epoch"]), history, float(trainer["best_value"]), best)


def prepare_run(out_dir: str | Path, run_cfg: dict, resume: bool = True) -> Path | None:
    """Make ``out_dir`` ready for :func:`fit`; -> the resume point to continue from, or None.

    First removes what killed writes left (:func:`pfl.utils.remove_stale`). With ``resume``
    and a point on disk, checks that ``config.json`` holds the same configs as ``run_cfg``
    and returns the point (converting the layout of older pfl versions). Otherwise starts
    over: the old point goes first (so that an interrupted start-over is never resumed into),
    then the final outputs (the checkpoint first), then ``config.json`` is written. Only one
    process may call this for a folder (with DistributedDataParallel: rank 0).
    """
    out_dir = Path(out_dir)
    root = out_dir / RESUME
    remove_stale(out_dir)
    remove_stale(root, points=True)
    point = latest_point(root)
    if resume and (point is not None or (root / STATE).is_file()):
        _check_resume_config(read_run_config(out_dir), run_cfg, out_dir)
        if point is None:
            point = _convert_legacy(out_dir, int(run_cfg["train"]["epochs"]))
        for name in (root / STATE, root / TRAINABLE, out_dir / BEST):  # the old layout's
            name.unlink(missing_ok=True)
        return point
    discard(root)
    _remove_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / CONFIG, run_cfg)
    return None


def publish_outputs(out_dir: str | Path, method: Method, history: History) -> None:
    """The final outputs of a finished run, from ``method`` (the selected state) and
    ``history``; ``checkpoint.safetensors`` last, so that its presence means the whole set."""
    history.save(out_dir)
    _write_state(Path(out_dir) / CHECKPOINT, method)


def _remove_outputs(out_dir: Path) -> None:
    for name in (*OUTPUTS, BEST):  # the checkpoint first: without it the rest is not a run
        (out_dir / name).unlink(missing_ok=True)


def _convert_legacy(out_dir: Path, epochs: int) -> Path:
    """Turn the resume files of older pfl versions (``resume/state.pt`` with the history
    inside, ``resume/trainable.safetensors``, ``best.safetensors``) into a point.

    Those versions replaced the weights, then ``state.pt``: weights newer than the state
    mean a kill between the two, which would train an epoch twice, so that is refused.
    (File times can mislead only if the folder was copied without keeping them.)
    """
    root = out_dir / RESUME
    weights, state_path = root / TRAINABLE, root / STATE
    if not weights.is_file() or weights.stat().st_mtime_ns > state_path.stat().st_mtime_ns:
        raise ValueError(
            f"{root} holds a resume point of an older pfl version whose "
            f"{TRAINABLE} is {'missing' if not weights.is_file() else 'newer than its ' + STATE}"
            ": a write was interrupted between the two files, and resuming would train an "
            f"epoch twice. Start the run over: delete {root} (then fit, or python -m pfl "
            "train, starts afresh), or pass resume=False to fit")
    trainer = torch.load(state_path, weights_only=True)
    history = json.dumps(json.loads(trainer.pop("history")), indent=2) + "\n"
    files = {TRAINABLE: lambda p: shutil.copyfile(weights, p),
             STATE: lambda p: torch.save(trainer, p),
             HISTORY: lambda p: Path(p).write_text(history)}
    if (out_dir / BEST).is_file():
        files[BEST] = lambda p: shutil.copyfile(out_dir / BEST, p)
    point = write_point(root, files)
    if int(trainer["epoch"]) < epochs:  # the old layout's progress files (and any stale checkpoint)
        _remove_outputs(out_dir)
    return point


# --------------------------------------------------------------------------- fit


def _callbacks(callbacks: Iterable[Callable[[History, dict], None]], history: History,
               row: dict) -> None:
    for callback in callbacks:
        callback(history, row)


def _run_config(method: Method, cfg: TrainConfig, profile: Profile | None) -> dict:
    model_cfg = getattr(method, "cfg", None)
    return {
        "method": method.name,
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else None,
        "profile": profile.to_dict() if profile is not None else None,
    }


def _check_resume_config(saved: dict, now: dict, out_dir: Path) -> None:
    for key in ("method", "train", "model"):
        if json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(now.get(key))):
            raise ValueError(
                f"{out_dir} holds a run with another {key} config than this one; resume it "
                "with the same configs, or pass resume=False (or a new out_dir) to start over"
            )


def fit(
    method: Method,
    train: FeatureStore,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    profile: Profile | None = None,
    eval_cfg: EvalConfig | None = None,
    monitor: Mapping[str, FeatureStore] | None = None,
    target: FeatureStore | None = None,
    resume: bool = True,
    callbacks: Iterable[Callable[[History, dict], None]] = (),
    progress: bool | None = None,
    monitor_initial: bool = False,
    diagnostics_every: int = 0,
    diagnostics_images: int = 8,
) -> History:
    """Train ``method`` on the auxiliary split ``train``; write checkpoints to ``out_dir``.

    Args:
        method: any ``Method`` (its ``training_step`` draws R and the bank).
        train: features of the auxiliary training split (:func:`pfl.run.features.extract`).
        cfg: epochs, batch size, optimiser, selection (module docstring).
        profile: stored in ``config.json`` so that ``evaluate``/``predict`` can rebuild it.
        eval_cfg: how held-out and monitored sets are scored each epoch (default
            ``EvalConfig()``).
        monitor: datasets scored after every epoch for the record only (loss and every
            metric, e.g. the aux test split and the target domain for Figure A.3's question).
            They never influence training or selection.
        monitor_initial: also score ``monitor`` before the first step (an epoch-0 row).
        target: the target dataset, read only by ``selection="official_target"``.
        resume: continue from the newest point in ``out_dir/resume`` (of a finished run,
            only the final outputs are rewritten); False: start over.
        callbacks: ``f(history, epoch_row)`` after each epoch's checkpoint is written.
        progress: tqdm bars (None: only when stderr is a terminal).
        diagnostics_every: Bayes-PFL only: every this many steps, add
            :func:`pfl.method.diagnostics.posterior_diagnostics` (R = ``mc_test``, noise from
            ``cfg.seed``) of :func:`diagnostics_batch` to the step's row, as ``post/<key>``
            columns of ``steps_frame()`` (NaN on the other steps). 0 (default): off. It draws
            from no training stream: the weights are those of a run without it.
        diagnostics_images: how many training images those diagnostics look at.
    Returns:
        :class:`History` (also in ``out_dir``); ``method`` holds the selected state.
    Raises:
        NonFiniteLossError: a loss term was NaN/inf; names the step and term; the last good
            checkpoint (the last finished epoch) stays on disk.
    """
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"TrainConfig.selection must be one of {SELECTIONS}, got "
                         f"{cfg.selection!r}")
    out_dir = Path(out_dir)
    eval_cfg = eval_cfg or EvalConfig()
    monitor = dict(monitor or {})
    history = History(selection=cfg.selection, out_dir=str(out_dir))

    # Selection data: held-out aux categories, or (authors' option) target categories.
    select_store, select_prefix = None, None
    if cfg.selection == "holdout":
        history.holdout = holdout_split(train.classes, cfg.holdout_classes, cfg.seed)
        select_store = train.subset(classes=history.holdout)
        train = train.subset(exclude=history.holdout)
        select_prefix = "select"
    elif cfg.selection == "official_target":
        if target is None:
            raise ValueError("selection='official_target' needs target=<target FeatureStore> "
                             "(it reads target categories: the authors' leaky selection)")
        select_store = target.subset(classes=official_selection_classes(target.classes))
        select_prefix = "select"

    track = None
    if diagnostics_every:
        if diagnostics_every < 0 or not isinstance(method, BayesPFL):
            raise ValueError(f"diagnostics_every={diagnostics_every}: the posterior diagnostics "
                             f"need a BayesPFL model (got {method.name!r}) and a count of steps "
                             ">= 1; pass 0 to switch them off")
        track = diagnostics_batch(train, diagnostics_images)
        track_feats = track.features(method.backbone)  # fixed images: encoded once

    n_steps = steps_per_epoch(len(train), cfg)
    opt, sched = build_optimizer(method, cfg, n_steps * cfg.epochs)
    state = ResumeState(0, history)
    point = None
    if distributed.is_main():  # under torchrun rank 0 alone prepares the folder
        point = prepare_run(out_dir, _run_config(method, cfg, profile), resume)
    distributed.barrier()
    if not distributed.is_main() and resume:  # the other ranks read what rank 0 left
        point = latest_point(out_dir / RESUME)
    if point is not None:
        state = load_resume_point(point, method, opt, sched)
        history = state.history
        history.out_dir = str(out_dir)
    resume_dir = out_dir / RESUME

    show = progress_enabled(progress) and distributed.is_main()
    stepper = distributed.Stepper(method)  # DDP under torchrun, else the plain step
    needs_images = _needs_images(method)
    if monitor and monitor_initial and state.epoch == 0 and not history.epochs:
        history.epochs.append(_monitor_row(method, monitor, cfg, eval_cfg, epoch=0,
                                           row={"epoch": 0, "train_loss": math.nan}))
    for epoch in range(state.epoch, cfg.epochs):
        set_mode(method, True)
        order = _generator(cfg.seed, epoch, 0)
        step_gen = _generator(cfg.seed, epoch, 1)
        totals = []
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show)
        steps = stepper.steps(train, cfg.batch_size, order, step_gen, needs_images)
        for i, (batch, total, terms) in zip(range(n_steps), steps):
            step = epoch * n_steps + i + 1
            bad = [k for k, v in terms.items() if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(
                    f"step {step} (epoch {epoch + 1}, batch {i + 1}): loss term {bad[-1]!r} is "
                    f"{terms[bad[-1]]} (all terms: {terms}). Nothing of this epoch was saved; "
                    f"the last good resume point is in {resume_dir} (epoch {epoch}). Lower the "
                    "learning rate or check the inputs of this batch: "
                    f"{batch.paths[:3]}"
                )
            opt.zero_grad(set_to_none=True)
            stepper.backward(total)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            step_row = {"epoch": epoch + 1, "step": step, "lr": lr, **terms}
            if track is not None and step % diagnostics_every == 0:
                post = posterior_diagnostics(method, track_feats, track.cls_names, seed=cfg.seed)
                step_row |= {f"post/{k}": v for k, v in post.items()}
            history.steps.append(step_row)
            totals.append(terms["total"])
            bar.set_postfix(loss=f"{terms['total']:.4f}")
            bar.update()
        bar.close()

        row: dict = {"epoch": epoch + 1, "train_loss": float(np.mean(totals))}
        if select_store is not None:
            row |= _epoch_metrics(method, select_store, eval_cfg, select_prefix)
        history.epochs.append(_monitor_row(method, monitor, cfg, eval_cfg, epoch + 1, row))

        stop = False
        if select_store is not None:
            value = _selection_value(row, select_prefix, cfg.selection_metric)
            if value > state.best_value or history.best_epoch is None:
                state.best_value, history.best_epoch = value, epoch + 1
                state.best_state = _state_tensors(method)
            # The authors' early stopping: `patience` epochs without a better value.
            stop = cfg.patience is not None and epoch + 1 - history.best_epoch >= cfg.patience
        else:
            history.best_epoch = epoch + 1
        state.epoch = epoch + 1
        if distributed.is_main():  # the same state on every rank; rank 0 writes it
            save_resume_point(out_dir, method, opt, sched, state)
        for callback in callbacks:
            callback(history, row)
        if stop:
            break

    if state.best_state is not None:
        method.load_trainable_state_dict(state.best_state)
    if cfg.second_stage_epochs and callable(getattr(method, "begin_second_stage", None)):
        second_stage(method, train, cfg, history, show)
    if distributed.is_main():
        publish_outputs(out_dir, method, history)
    distributed.barrier()  # no rank returns before rank 0 has published
    set_mode(method, False)
    return history


def second_stage(method: Method, train: FeatureStore, cfg: TrainConfig, history: History,
                 show: bool = False) -> None:
    """The authors' second stage (``ModelConfig.second_stage``): after the first stage, train
    only ``phi`` and the second-stage head on the CE loss for ``cfg.second_stage_epochs``
    epochs (Adam at ``cfg.lr``; the last epoch is kept). Steps are logged with ``stage = 2``.
    Not resumable: an interrupted second stage restarts from the first stage's checkpoint.
    """
    params = method.begin_second_stage()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    n_steps = steps_per_epoch(len(train), cfg)
    for epoch in range(cfg.epochs, cfg.epochs + cfg.second_stage_epochs):
        set_mode(method, True)
        batches = train.batches(cfg.batch_size, shuffle=True,
                                generator=_generator(cfg.seed, epoch, 0))
        step_gen = _generator(cfg.seed, epoch, 1)
        for i, batch in tqdm(zip(range(n_steps), batches), total=n_steps, disable=not show,
                             desc=f"second stage {epoch + 1 - cfg.epochs}"):
            loss = method.training_step(batch, step_gen)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            history.steps.append({"epoch": epoch + 1, "step": epoch * n_steps + i + 1,
                                  "stage": 2, "total": float(loss.total.detach()),
                                  **loss.terms})
    set_mode(method, False)


def train_profile(profile: Profile, out_dir: str | Path, *, method: str = "bayes-pfl",
                  backbone=None, progress: bool | None = None, **fit_kwargs
                  ) -> tuple[Method, History]:
    """Train ``method`` on the profile's auxiliary dataset (``profile.data.aux``, split
    ``aux_split``), building the synthetic benchmark first if the profile uses it."""

    backbone = backbone if backbone is not None else load_backbone(profile.backbone)
    train = profile_store(profile, backbone, profile.data.aux, profile.data.aux_split,
                          progress=progress)
    if profile.train.selection == "official_target" and "target" not in fit_kwargs:
        fit_kwargs["target"] = profile_store(profile, backbone, profile.data.targets[0], "test",
                                             progress=progress)
    m = build_method(method, profile, backbone)
    history = fit(m, train, profile.train, out_dir, profile=profile, eval_cfg=profile.eval,
                  progress=progress, **fit_kwargs)
    return m, history


# --------------------------------------------------------------------------- seeds


@dataclass
class SeedSummary:
    """Per-seed tables and their mean and std (the paper averages 5 seeds, appendix A.1).

    tables: ``{seed: {dataset: per-category table}}``; mean/std: ``{dataset: table}`` of the
    element-wise mean and sample std (ddof=1) over seeds.
    """

    tables: dict[int, dict[str, pd.DataFrame]]
    mean: dict[str, pd.DataFrame]
    std: dict[str, pd.DataFrame]
    histories: dict[int, History]


def fit_seeds(
    make_method: Callable[[int], Method],
    train: FeatureStore,
    cfg: TrainConfig,
    out_dir: str | Path,
    targets: Mapping[str, FeatureStore],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_cfg: EvalConfig | None = None,
    profile: Profile | None = None,
    progress: bool | None = None,
    resume: bool = True,
) -> SeedSummary:
    """Train one method per seed (``make_method(seed)``, ``cfg.seed = seed``) and evaluate
    each zero-shot on ``targets``; return per-seed tables and their mean and std.

    ``resume`` is :func:`fit`'s: ``False`` trains every seed from scratch even where
    ``out_dir`` holds a finished run (a notebook that shows training, re-executed)."""

    eval_cfg = eval_cfg or EvalConfig()
    tables: dict[int, dict[str, pd.DataFrame]] = {}
    histories: dict[int, History] = {}
    for seed in seeds:
        method = make_method(seed)
        run_cfg = dataclasses.replace(cfg, seed=seed)
        histories[seed] = fit(method, train, run_cfg, Path(out_dir) / f"seed{seed}",
                              profile=profile, eval_cfg=eval_cfg, progress=progress,
                              resume=resume)
        tables[seed] = {
            name: evaluate(method, store, dataclasses.replace(eval_cfg, seed=seed), name=name,
                           progress=progress).table
            for name, store in targets.items()
        }
    mean, std = {}, {}
    for name in targets:
        stack = np.stack([tables[s][name].to_numpy(dtype=float) for s in seeds])
        like = tables[seeds[0]][name]
        mean[name] = pd.DataFrame(stack.mean(0), index=like.index, columns=like.columns)
        sd = stack.std(0, ddof=1) if len(seeds) > 1 else np.zeros_like(stack[0])
        std[name] = pd.DataFrame(sd, index=like.index, columns=like.columns)
    return SeedSummary(tables=tables, mean=mean, std=std, histories=histories)
