"""Auxiliary training of any method: optimiser, schedule, selection, resume.

Appendix A.1: the new modules train on the auxiliary dataset only (VisA for every target,
MVTec-AD when the target is VisA) with Adam, lr 1e-4, batch 32, 20 epochs; R = 1 and one
random bank index per step (both are the method's business, in ``training_step``).

Named options where the authors' code differs (REFERENCE.md, "Maps, scores, losses"):

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

Checkpoints (``out_dir``): ``checkpoint.safetensors`` (the selected trainable state only; CLIP
is loaded apart) and ``config.json`` (method name, the configs); ``history.json`` with
``steps.csv`` / ``epochs.csv`` beside them; ``resume/`` holds the state after the last
completed epoch (trainable state, optimiser and scheduler state, history, best so far), every
file written atomically. Every random draw of an epoch comes from generators seeded by
``(cfg.seed, epoch)``, so there is no RNG stream to carry over: a run interrupted at any point
and resumed from ``resume/`` ends bit-identical to an uninterrupted one on CPU
(tests/test_train.py).
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
from pfl.method.contract import Method
from pfl.run import distributed
from pfl.run.checkpoints import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    RESUME,
    build_method,
    set_mode,
)
from pfl.run.evaluate import evaluate
from pfl.run.features import FeatureStore, profile_store, progress_enabled
from pfl.utils import atomic_write, atomic_write_json, atomic_write_text

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

    steps: ``{"epoch", "step", "lr", "total", <every loss term>}`` (epoch 1-based).
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
        return cls.from_dict(json.loads((Path(out_dir) / HISTORY).read_text()))


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
        resume: continue from ``out_dir/resume`` when it holds an unfinished run.
        callbacks: ``f(history, epoch_row)`` after each epoch's checkpoint is written.
        progress: tqdm bars (None: only when stderr is a terminal).
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
        select_store = target.subset(classes=target.classes[:OFFICIAL_TARGET_CLASSES])
        select_prefix = "select"

    n_steps = steps_per_epoch(len(train), cfg)
    opt, sched = build_optimizer(method, cfg, n_steps * cfg.epochs)
    run_cfg = _run_config(method, cfg, profile)
    best_value = -math.inf
    start_epoch = 0
    resume_dir = out_dir / RESUME
    if resume and (resume_dir / "state.pt").is_file():
        _check_resume_config(json.loads((out_dir / CONFIG).read_text()), run_cfg, out_dir)
        state = torch.load(resume_dir / "state.pt", weights_only=True)
        method.load_trainable_state_dict(load_file(str(resume_dir / "trainable.safetensors")))
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history = History.from_dict(json.loads(state["history"]))
        best_value, start_epoch = float(state["best_value"]), int(state["epoch"])
    elif distributed.is_main():  # under torchrun rank 0 alone writes
        # A fresh start: remove what an older run left, so it can never be resumed into this one.
        shutil.rmtree(resume_dir, ignore_errors=True)
        (out_dir / "best.safetensors").unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / CONFIG, run_cfg)

    show = progress_enabled(progress) and distributed.is_main()
    stepper = distributed.Stepper(method)  # DDP under torchrun, else the plain step
    needs_images = _needs_images(method)
    if monitor and monitor_initial and start_epoch == 0 and not history.epochs:
        history.epochs.append(_monitor_row(method, monitor, cfg, eval_cfg, epoch=0,
                                           row={"epoch": 0, "train_loss": math.nan}))
    for epoch in range(start_epoch, cfg.epochs):
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
                    f"the last good checkpoint is {resume_dir} (epoch {epoch}). Lower the "
                    "learning rate or check the inputs of this batch: "
                    f"{batch.paths[:3]}"
                )
            opt.zero_grad(set_to_none=True)
            stepper.backward(total)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            history.steps.append({"epoch": epoch + 1, "step": step, "lr": lr, **terms})
            totals.append(terms["total"])
            bar.set_postfix(loss=f"{terms['total']:.4f}")
            bar.update()
        bar.close()

        row: dict = {"epoch": epoch + 1, "train_loss": float(np.mean(totals))}
        if select_store is not None:
            row |= _epoch_metrics(method, select_store, eval_cfg, select_prefix)
        history.epochs.append(_monitor_row(method, monitor, cfg, eval_cfg, epoch + 1, row))

        if select_store is not None:
            value = _selection_value(row, select_prefix, cfg.selection_metric)
            if value > best_value or history.best_epoch is None:
                best_value, history.best_epoch = value, epoch + 1
                if distributed.is_main():
                    _write_state(out_dir / "best.safetensors", method)
        else:
            history.best_epoch = epoch + 1

        # The resume point: trainable state, optimiser, schedule, history, best so far.
        if not distributed.is_main():  # the same state on every rank; rank 0 writes it
            _callbacks(callbacks, history, row)
            continue
        resume_dir.mkdir(parents=True, exist_ok=True)
        _write_state(resume_dir / "trainable.safetensors", method)
        state = {"optimizer": opt.state_dict(), "epoch": epoch + 1, "best_value": best_value,
                 "scheduler": sched.state_dict() if sched is not None else {},
                 "history": json.dumps(history.to_dict())}
        atomic_write(resume_dir / "state.pt", lambda p, s=state: torch.save(s, p))
        history.save(out_dir)
        _callbacks(callbacks, history, row)

    distributed.barrier()  # rank 0 has written best.safetensors
    if select_store is not None and (out_dir / "best.safetensors").is_file():
        method.load_trainable_state_dict(load_file(str(out_dir / "best.safetensors")))
    if distributed.is_main():
        _write_state(out_dir / CHECKPOINT, method)
        history.save(out_dir)
    set_mode(method, False)
    return history


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
) -> SeedSummary:
    """Train one method per seed (``make_method(seed)``, ``cfg.seed = seed``) and evaluate
    each zero-shot on ``targets``; return per-seed tables and their mean and std."""

    eval_cfg = eval_cfg or EvalConfig()
    tables: dict[int, dict[str, pd.DataFrame]] = {}
    histories: dict[int, History] = {}
    for seed in seeds:
        method = make_method(seed)
        run_cfg = dataclasses.replace(cfg, seed=seed)
        histories[seed] = fit(method, train, run_cfg, Path(out_dir) / f"seed{seed}",
                              profile=profile, eval_cfg=eval_cfg, progress=progress)
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
