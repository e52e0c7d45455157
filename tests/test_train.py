"""pfl.run.train: determinism, exact resume, NaN stop, optimiser groups and schedule, model
selection without target categories, several seeds. All on a toy method (tests/_toy.py)."""

import math

import numpy as np
import pytest
import torch
from _toy import RecordingStore, ToyMethod, toy_store
from safetensors.torch import load_file

from pfl.clip.backbone import TINY_WEIGHTS
from pfl.config import EvalConfig, TrainConfig
from pfl.run.checkpoints import build_method, load_checkpoint
from pfl.run.train import (
    OFFICIAL_LRS,
    History,
    NonFiniteLossError,
    build_optimizer,
    fit,
    fit_seeds,
    holdout_split,
)
from pfl.utils import latest_point

AUX = ["a", "b", "c", "d"]
TARGET = ["v", "w", "x", "y", "z", "zz"]
CFG = TrainConfig(epochs=3, batch_size=4, lr=0.05, seed=3)
EVAL = EvalConfig(batch_size=8, sigma=0.0)


@pytest.fixture(scope="module")
def aux():
    return toy_store(AUX, n_per_class=6, seed=0)


@pytest.fixture(scope="module")
def target():
    return toy_store(TARGET, n_per_class=6, seed=1)


def params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(p, q):
    assert p.keys() == q.keys()
    for k in p:
        assert torch.equal(p[k], q[k]), k


def test_deterministic_for_a_seed(aux, tmp_path):
    h1 = fit(m1 := ToyMethod(), aux, CFG, tmp_path / "r1")
    h2 = fit(m2 := ToyMethod(), aux, CFG, tmp_path / "r2")
    assert_same(params(m1), params(m2))
    assert h1.steps == h2.steps and len(h1.steps) == 3 * 6  # 24 samples / batch 4
    # A different seed gives another run (the test could fail).
    fit(m3 := ToyMethod(), aux, TrainConfig(**{**CFG.__dict__, "seed": 4}), tmp_path / "r3")
    assert not torch.equal(m1.heads, m3.heads)


def test_resume_after_interruption_equals_uninterrupted(aux, tmp_path):
    full = ToyMethod()
    h_full = fit(full, aux, CFG, tmp_path / "full")

    def stop_after_first(history, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fit(ToyMethod(), aux, CFG, run, callbacks=[stop_after_first])
    assert History.load(run).epochs[-1]["epoch"] == 1  # the progress, from the resume point
    assert not (run / "history.json").exists()  # final outputs only once the run is done
    resumed = ToyMethod(seed=99)  # a fresh object with other init: all state comes from disk
    h_res = fit(resumed, aux, CFG, run)
    assert_same(params(full), params(resumed))
    assert h_res.steps == h_full.steps and h_res.epochs == h_full.epochs
    assert_same(load_file(str(run / "checkpoint.safetensors")),
                load_file(str(tmp_path / "full" / "checkpoint.safetensors")))


def test_resume_with_official_schedule_and_another_config(aux, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "optimizer": "official"})
    full = ToyMethod()
    fit(full, aux, cfg, tmp_path / "full")

    def stop(history, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(ToyMethod(), aux, cfg, tmp_path / "cut", callbacks=[stop])
    with pytest.raises(ValueError, match="another train config"):
        fit(ToyMethod(), aux, CFG, tmp_path / "cut")
    resumed = ToyMethod()
    fit(resumed, aux, cfg, tmp_path / "cut")
    assert_same(params(full), params(resumed))


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_good(aux, tmp_path):
    # 6 steps per epoch: call 9 is step 9, the 3rd batch of epoch 2.
    with pytest.raises(NonFiniteLossError, match=r"step 9 \(epoch 2, batch 3\).*'image'"):
        fit(ToyMethod(nan_at_call=9), aux, CFG, tmp_path / "nan")
    one = ToyMethod()
    fit(one, aux, TrainConfig(**{**CFG.__dict__, "epochs": 1}), tmp_path / "one")
    kept = load_file(str(latest_point(tmp_path / "nan" / "resume") / "trainable.safetensors"))
    assert_same(kept, params(one))  # the paper optimiser has no schedule: epoch 1 is equal


def test_official_optimizer_groups_and_cosine_warmup(aux):
    m = ToyMethod()
    cfg = TrainConfig(optimizer="official", lr=0.5)
    total = 40
    opt, sched = build_optimizer(m, cfg, total)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        k: OFFICIAL_LRS[k] / 4 for k in ("prompts", "temperatures", "rest")}  # warm-up 1/4
    assert opt.defaults["betas"] == (0.5, 0.999)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = 4  # 10 % of 40
    expect = [OFFICIAL_LRS["prompts"] * ((s + 1) / warm if s < warm else
              0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))) for s in range(total)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-12)
    # The paper optimiser: one group at cfg.lr, default betas, no schedule.
    opt, sched = build_optimizer(m, TrainConfig(lr=0.5), total)
    assert sched is None and len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.5


def test_default_selection_never_reads_target(aux, target, tmp_path):
    for selection, holdout in (("last", 0), ("holdout", 1)):
        read_train, read_target = set(), set()
        m = ToyMethod()
        cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2, "selection": selection,
                             "holdout_classes": holdout})
        h = fit(m, RecordingStore(aux, read_train), cfg, tmp_path / selection, eval_cfg=EVAL,
                target=RecordingStore(target, read_target))
        assert read_target == set(), selection
        assert read_train == set(AUX)
        assert m.seen_classes <= set(AUX) - set(h.holdout)  # held-out classes never trained
    # The authors' option does read target categories (so the recorder works).
    read_target = set()
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1, "selection": "official_target"})
    fit(ToyMethod(), aux, cfg, tmp_path / "official", eval_cfg=EVAL,
        target=RecordingStore(target, read_target))
    assert read_target == set(sorted(TARGET)[:5])


def test_holdout_selects_best_epoch_and_loads_it(aux, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 4, "lr": 0.3, "selection": "holdout",
                         "holdout_classes": 1})
    m = ToyMethod()
    h = fit(m, aux, cfg, tmp_path / "run", eval_cfg=EVAL)
    values = [r["select/pixel_ap"] for r in h.epochs]
    assert h.best_epoch == int(np.argmax(values)) + 1
    assert h.holdout == holdout_split(AUX, 1, cfg.seed)
    best = load_file(str(latest_point(tmp_path / "run" / "resume") / "best.safetensors"))
    assert_same(params(m), best)
    assert_same(params(m), load_file(str(tmp_path / "run" / "checkpoint.safetensors")))


def test_monitor_is_recorded_but_does_not_change_training(aux, target, tmp_path):
    plain = ToyMethod()
    fit(plain, aux, CFG, tmp_path / "plain")
    watched = ToyMethod()
    h = fit(watched, aux, CFG, tmp_path / "watched", eval_cfg=EVAL, monitor={"target": target},
            monitor_initial=True)
    assert_same(params(plain), params(watched))
    from pfl.run.evaluate import evaluate

    assert [r["epoch"] for r in h.epochs] == [0, 1, 2, 3]
    untrained = evaluate(ToyMethod(), target, EVAL).table.loc["mean"]
    assert h.epochs[0]["target/pixel_ap"] == untrained["pixel_ap"]
    row = h.epochs[-1]
    assert {"target/loss", "target/pixel_ap", "target/image_auroc"} <= set(row)
    steps = h.steps_frame()
    assert {"total", "pixel", "image", "lr"} <= set(steps.columns)
    np.testing.assert_allclose(steps["total"], steps["pixel"] + steps["image"], rtol=1e-6)
    epochs = (tmp_path / "watched" / "epochs.csv").read_text()
    assert "target/pixel_ap" in epochs


def test_trained_beats_untrained_on_unseen_categories(aux, target, tmp_path):
    from pfl.run.evaluate import evaluate

    before = evaluate(ToyMethod(), target, EVAL).table.loc["mean"]
    m = ToyMethod()
    fit(m, aux, TrainConfig(**{**CFG.__dict__, "epochs": 5}), tmp_path / "run")
    after = evaluate(m, target, EVAL).table.loc["mean"]
    # Measured (seed 3): pixel AUROC 0.364 -> 0.962, image AUROC 0.500 -> 0.796.
    assert after["pixel_auroc"] > before["pixel_auroc"] + 0.2
    assert after["image_auroc"] > before["image_auroc"] + 0.2
    loaded = load_checkpoint(ToyMethod(seed=5), tmp_path / "run")
    assert_same(params(loaded), params(m))


def test_fit_seeds_mean_and_std(aux, target, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1})
    s = fit_seeds(lambda seed: ToyMethod(seed=seed), aux, cfg, tmp_path, {"target": target},
                  seeds=(0, 1, 2), eval_cfg=EVAL)
    stack = np.stack([s.tables[k]["target"].to_numpy(float) for k in (0, 1, 2)])
    np.testing.assert_allclose(s.mean["target"].to_numpy(float), stack.mean(0))
    np.testing.assert_allclose(s.std["target"].to_numpy(float), stack.std(0, ddof=1))
    assert (s.std["target"].loc["mean"] > 0).any()


@pytest.mark.slow
@pytest.mark.skipif(not TINY_WEIGHTS.is_file(), reason="needs the shipped tiny CLIP weights")
def test_bayes_pfl_trained_beats_untrained_zero_shot(tmp_path):
    """Bayes-PFL on the smoke profile (shipped tiny CLIP, synthetic benchmark): one epoch on
    the aux domain lifts zero-shot pixel AUROC on the unseen target categories.

    Measured (this test's subset, 5 + 5 images per target category, seed 0) on tiny-v2 with the
    smoke prior N(0, 0.02^2 I): untrained pixel AUROC 0.442, after one epoch 0.619 (under the
    paper's prior 0.611; on tiny-v1 0.392 -> 0.772; on tiny-v2 the first epoch can end in a dip
    that the recipe's three epochs climb out of, notebook 05). The image AUROC is not asserted:
    it stays near chance on the tiny towers (notebook 05).
    """
    from pfl import config
    from pfl.clip.backbone import load_backbone
    from pfl.run.evaluate import evaluate
    from pfl.run.features import profile_store

    profile = config.smoke().replace(train={"epochs": 1})
    backbone = load_backbone(profile.backbone)
    train = profile_store(profile, backbone, "aux", profile.data.aux_split)
    target = profile_store(profile, backbone, "target", "test", per_class=5)
    before = evaluate(build_method("bayes-pfl", profile, backbone), target, profile.eval)
    method = build_method("bayes-pfl", profile, backbone)
    fit(method, train, profile.train, tmp_path / "run", profile=profile)
    after = evaluate(method, target, profile.eval)
    b, a = before.table.loc["mean"], after.table.loc["mean"]
    print(f"pixel AUROC {b['pixel_auroc']:.3f} -> {a['pixel_auroc']:.3f}, "
          f"image AUROC {b['image_auroc']:.3f} -> {a['image_auroc']:.3f}")
    assert a["pixel_auroc"] > b["pixel_auroc"] + 0.1
