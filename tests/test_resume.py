"""Resume is one atomic unit (pfl.utils.write_point, used by pfl.run.train.fit and
pfl.clip.pretrain.pretrain).

The fault injection: :func:`kill_at` counts every call that changes the disk (``os.mkdir``,
``os.fsync``, ``os.rename``, ``os.replace``, ``os.unlink``, ``os.remove``, ``os.rmdir``; every
file is flushed with ``os.fsync`` right after it is written, so consecutive file writes are
separated by a counted call), raises :class:`Killed` at the k-th, and makes every later call a
no-op, so the clean-up code that runs while the exception unwinds (``finally``, ``except``)
changes nothing on disk, as after a SIGKILL. A run killed at every k in turn, then resumed,
must equal the uninterrupted run bit for bit, never train an epoch (step) twice, and leave
no temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from _toy import ToyMethod, toy_store
from safetensors.torch import load_file

from pfl.clip import pretrain as P
from pfl.config import EvalConfig, TrainConfig
from pfl.run.train import History, fit
from pfl.utils import atomic_write_text, latest_point, remove_stale, write_point

MUTATIONS = ("mkdir", "fsync", "rename", "replace", "unlink", "remove", "rmdir")


class Killed(BaseException):
    """A simulated kill: not an ``Exception``, so no ``except Exception`` in pfl catches it."""


@contextlib.contextmanager
def kill_at(k: int | None):
    """Raise :class:`Killed` at the k-th disk mutation (None: never); yields the call log."""
    log: list[str] = []
    dead = False
    real = {name: getattr(os, name) for name in MUTATIONS}

    def wrap(name):
        def call(*args, **kwargs):
            nonlocal dead
            if dead:
                return None
            log.append(f"{name}({args[0] if args else ''})")
            if len(log) == k:
                dead = True
                raise Killed(f"killed at call {k}: {log[-1]}")
            if name == "fsync":
                return None  # durability across power cuts is not what this checks; it is slow
            return real[name](*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in MUTATIONS:
            mp.setattr(os, name, wrap(name))
        yield log


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere below ``folder``, and points beside the newest."""
    found = [str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.name.startswith(".") or p.name.endswith(".tmp")]
    resume = folder / "resume"
    if resume.is_dir():
        found += [f"resume/{p.name}" for p in resume.iterdir() if p != latest_point(resume)]
    return sorted(found)


def files_of(folder: Path, names, replace: str = "") -> dict[str, bytes]:
    """The bytes of each file (the run folder's own path blanked, for history.json)."""
    out = {}
    for name in names:
        data = (folder / name).read_bytes()
        out[name] = data.replace(replace.encode(), b"<run>") if replace else data
    return out


# --------------------------------------------------------------------------- the helper


def test_a_point_is_published_whole_and_the_previous_one_stays_until_then(tmp_path):
    root = tmp_path / "resume"
    first = write_point(root, {"w": lambda p: Path(p).write_text("1"),
                               "s": lambda p: Path(p).write_text("1")})
    seen = []

    def write_and_look(p):
        seen.append(latest_point(root))  # while the second point is being written
        Path(p).write_text("2")

    def fail(p):
        Path(p).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_point(root, {"w": write_and_look, "s": fail})
    assert seen == [first] and latest_point(root) == first
    assert (first / "w").read_text() == (first / "s").read_text() == "1"
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # the failed one is gone
    second = write_point(root, {"w": write_and_look, "s": lambda p: Path(p).write_text("2")})
    assert latest_point(root) == second != first and not first.exists()
    assert (second / "w").read_text() == (second / "s").read_text() == "2"
    with pytest.raises(ValueError, match="plain names"):
        write_point(root, {"../x": lambda p: None})


def test_remove_stale_takes_leftovers_only(tmp_path):
    root = tmp_path / "resume"
    old = write_point(root, {"a": lambda p: Path(p).write_text("old")})
    (tmp_path / "keep").mkdir()
    new = root / "000002"  # as after a kill between publishing a point and removing the older
    shutil.copytree(old, new)
    with pytest.raises(Killed), kill_at(3):  # mkdir, fsync, then killed before the rename
        write_point(root, {"a": lambda p: Path(p).write_text("never published")})
    with pytest.raises(Killed), kill_at(2):  # mkstemp's file is written, killed at the replace
        atomic_write_text(root / "notes.txt", "x")
    (root / "notes.txt").write_text("a user's file")
    (root / "999").mkdir()  # not a generation name: too short
    stale = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert len(stale) == 2  # one point folder, one atomic_write file
    assert latest_point(root) == new  # a folder being written is never taken for a point
    assert sorted(remove_stale(tmp_path)) == []  # not a root of points: "resume" is no leftover
    assert sorted(remove_stale(root, points=True)) == sorted([old.name, *stale])
    assert sorted(p.name for p in root.iterdir()) == ["000002", "999", "notes.txt"]
    assert remove_stale(tmp_path / "missing") == []


# --------------------------------------------------------------------------- fit

# 2 steps in each of 3 epochs; the holdout selection picks epoch 2 (measured), so the final
# checkpoint comes from the best state carried in the points, not from the last epoch.
CFG = TrainConfig(epochs=3, batch_size=4, seed=2, optimizer="official", selection="holdout",
                  holdout_classes=1, max_steps_per_epoch=2)
EVAL = EvalConfig(batch_size=8, sigma=0.0)
FINAL = ("config.json", "history.json", "steps.csv", "epochs.csv", "checkpoint.safetensors")


@pytest.fixture(scope="module")
def aux():
    return toy_store(["a", "b", "c", "d"], n_per_class=4, seed=0)


def epochs_done(run: Path) -> int:
    point = latest_point(run / "resume")
    return 0 if point is None else int(torch.load(point / "state.pt")["epoch"])


def finish(run: Path, aux) -> tuple[ToyMethod, History]:
    """Rerun ``run``. Past its first point, with a method of another init: all state must then
    come from disk (before it, the run starts over from the method it is given)."""
    method = ToyMethod(seed=99 if epochs_done(run) else 0)
    return method, fit(method, aux, CFG, run, eval_cfg=EVAL, progress=False)


@pytest.mark.slow
def test_fit_killed_between_any_two_writes_resumes_bit_identical(aux, tmp_path):
    ref = tmp_path / "ref"
    with kill_at(None) as log:
        history = fit(ToyMethod(), aux, CFG, ref, eval_cfg=EVAL, progress=False)
    assert history.best_epoch == 2 < CFG.epochs
    expect = files_of(ref, FINAL, str(ref))
    expect_tensors = load_file(str(ref / "checkpoint.safetensors"))
    done_at_kill = set()
    for k in range(1, len(log) + 1):
        run = tmp_path / f"k{k:03d}"
        with pytest.raises(Killed), kill_at(k):
            fit(ToyMethod(), aux, CFG, run, eval_cfg=EVAL, progress=False)
        done_at_kill.add(done := epochs_done(run))
        method, resumed = finish(run, aux)
        where = f"killed at {log[k - 1]} (call {k} of {len(log)}, after {done} epochs)"
        assert method.calls == 2 * (CFG.epochs - done), where  # no epoch trained twice
        got = load_file(str(run / "checkpoint.safetensors"))
        assert got.keys() == expect_tensors.keys(), where
        for name, tensor in expect_tensors.items():
            assert torch.equal(got[name], tensor) and got[name].dtype == tensor.dtype, where
        assert files_of(run, FINAL, str(run)) == expect, where
        assert resumed.steps == history.steps and resumed.epochs == history.epochs, where
        assert leftovers(run) == [], where
        shutil.rmtree(run)
    assert done_at_kill == {0, 1, 2, 3}  # kills before, between and after every epoch


def test_fit_killed_in_each_phase_resumes_bit_identical(aux, tmp_path):
    """The fast sample of the test above: one kill in each phase of a run."""
    ref = tmp_path / "ref"
    with kill_at(None) as log:
        fit(ToyMethod(), aux, CFG, ref, eval_cfg=EVAL, progress=False)
    expect = files_of(ref, FINAL, str(ref))
    renames = [k for k, call in enumerate(log, 1) if call.startswith("rename")]
    temps = [k for k, call in enumerate(log, 1) if call.startswith("mkdir") and ".tmp-" in call]
    phases = {
        "writing the config": next(k for k, c in enumerate(log, 1) if "config.json" in c),
        "writing the first point": renames[0] - 1,  # its files are written, not yet published
        "between two files of the second point": temps[1] + 1,  # the weights, not the state
        "removing the first point": renames[1] + 1,  # the second is published
        "writing the final outputs": len(log),  # the checkpoint, the last of them
    }
    for phase, k in phases.items():
        run = tmp_path / phase.replace(" ", "_")
        with pytest.raises(Killed), kill_at(k):
            fit(ToyMethod(), aux, CFG, run, eval_cfg=EVAL, progress=False)
        assert leftovers(run), phase  # the kill left something to clean up
        finish(run, aux)
        assert files_of(run, FINAL, str(run)) == expect, phase
        assert leftovers(run) == [], phase


def test_history_of_an_unfinished_run_comes_from_its_point(aux, tmp_path):
    with pytest.raises(Killed):
        fit(ToyMethod(), aux, CFG, tmp_path, eval_cfg=EVAL, progress=False,
            callbacks=[lambda h, row: row["epoch"] == 2 and _raise(Killed())])
    assert not (tmp_path / "checkpoint.safetensors").exists()
    assert [r["epoch"] for r in History.load(tmp_path).epochs] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no history"):
        History.load(tmp_path / "nothing")


def _to_old_layout(run: Path, older_weights: bool) -> None:
    """Rewrite a run's newest point in the layout of older pfl versions (resume/state.pt with
    the history inside, resume/trainable.safetensors, best.safetensors, and the per-epoch
    history files beside config.json), dating the weights before (or after) the state."""
    point = latest_point(run / "resume")
    state = torch.load(point / "state.pt", weights_only=True)
    history = History.from_dict(json.loads((point / "history.json").read_text()))
    state["history"] = json.dumps(history.to_dict())
    shutil.copyfile(point / "best.safetensors", run / "best.safetensors")
    shutil.copyfile(point / "trainable.safetensors", run / "resume" / "trainable.safetensors")
    torch.save(state, run / "resume" / "state.pt")
    history.save(run)
    shutil.rmtree(point)
    t = (run / "resume" / "state.pt").stat().st_mtime_ns
    shift = -10**9 if older_weights else 10**9
    os.utime(run / "resume" / "trainable.safetensors", ns=(t + shift, t + shift))


def test_old_layout_resumes_and_is_converted(aux, tmp_path):
    ref = tmp_path / "ref"
    fit(ToyMethod(), aux, CFG, ref, eval_cfg=EVAL, progress=False)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        fit(ToyMethod(), aux, CFG, run, eval_cfg=EVAL, progress=False,
            callbacks=[lambda h, row: row["epoch"] == 2 and _raise(Killed())])
    _to_old_layout(run, older_weights=True)
    method, _ = finish(run, aux)
    assert method.calls == 2  # one epoch left
    assert files_of(run, FINAL, str(run)) == files_of(ref, FINAL, str(ref))
    assert sorted(p.name for p in run.iterdir()) == sorted([*FINAL, "resume"])
    assert [p.name for p in (run / "resume").iterdir()] == [latest_point(run / "resume").name]


def test_old_layout_torn_between_weights_and_state_is_refused(aux, tmp_path):
    with pytest.raises(Killed):
        fit(ToyMethod(), aux, CFG, tmp_path, eval_cfg=EVAL, progress=False,
            callbacks=[lambda h, row: _raise(Killed())])
    _to_old_layout(tmp_path, older_weights=False)  # the weights of a later epoch
    with pytest.raises(ValueError, match=f"{tmp_path / 'resume'}.*newer than its state.pt"
                                         ".*resume=False"):
        finish(tmp_path, aux)
    fit(ToyMethod(), aux, CFG, tmp_path, eval_cfg=EVAL, progress=False, resume=False)
    assert leftovers(tmp_path) == [] and not (tmp_path / "best.safetensors").exists()


def _raise(error: BaseException):
    raise error


# --------------------------------------------------------------------------- pretrain

MICRO = {"embed_dim": 8,
         "vision_cfg": {"image_size": 28, "layers": 1, "width": 16, "head_width": 8,
                        "patch_size": 14},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1,
                      "layers": 1}}
# 3 steps, the last at the final size (a phase switch), a point after each.
PRETRAIN = dict(model_name="pfl-micro-test", steps=3, batch=2, image_size=28, final_size=42,
                final_steps=1, final_batch=1, warmup=1, checkpoint_every=1, zoom=0.5)
PRETRAIN_FINAL = ("history.csv", "tiny_clip.safetensors", "tiny_clip.json")


@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory):
    """A one-block open_clip config, so that a pretraining run takes a fraction of a second."""
    path = tmp_path_factory.mktemp("cfg") / "pfl-micro-test.json"
    path.write_text(json.dumps(MICRO))
    open_clip.add_model_config(path)
    return P.PretrainConfig(**PRETRAIN)


def _pretrain(cfg, out, **kw):
    return P.pretrain(cfg, out, progress=False, command="test", machine="test", **kw)


def _steps_done(out: Path) -> int:
    point = latest_point(out / "resume")
    if point is None:
        return 0
    return len(P.read_history_csv(point / "history.csv"))


@pytest.mark.slow
def test_pretrain_killed_between_any_two_writes_resumes_bit_identical(micro_clip, tmp_path,
                                                                      monkeypatch):
    cfg = dataclasses.replace(micro_clip, checkpoint_every=2)  # points after steps 2 and 3
    ref = tmp_path / "ref"
    with kill_at(None) as log:
        full = _pretrain(cfg, ref)
    expect = files_of(ref, PRETRAIN_FINAL)
    expect_point = (latest_point(ref / "resume") / P.CHECKPOINT).read_bytes()
    starts = []
    stream = P.batch_stream
    monkeypatch.setattr(P, "batch_stream", lambda cfg, start, *a: starts.append(start) or
                        stream(cfg, start, *a))
    done_at_kill = set()
    for k in range(1, len(log) + 1):
        out = tmp_path / f"k{k:03d}"
        with pytest.raises(Killed), kill_at(k):
            _pretrain(cfg, out)
        done_at_kill.add(done := _steps_done(out))
        where = f"killed at {log[k - 1]} (call {k} of {len(log)}, after {done} steps)"
        assert _pretrain(cfg, out) == full, where
        assert starts[-1] == done, where  # resumed at the point: no step trained twice
        assert files_of(out, PRETRAIN_FINAL) == expect, where
        assert (latest_point(out / "resume") / P.CHECKPOINT).read_bytes() == expect_point, where
        assert leftovers(out) == [], where
        shutil.rmtree(out)
    assert done_at_kill == {0, 2, 3}


def test_pretrain_resumes_across_kills_and_from_the_old_layout(micro_clip, tmp_path):
    ref = tmp_path / "ref"
    with kill_at(None) as log:
        full = _pretrain(micro_clip, ref)
    expect = files_of(ref, PRETRAIN_FINAL)
    out = tmp_path / "run"
    renames = [k for k, call in enumerate(log, 1) if call.startswith("rename")]
    with pytest.raises(Killed), kill_at(renames[1] + 1):  # the 2nd point is out, the 1st not gone
        _pretrain(micro_clip, out)
    assert _steps_done(out) == 2 and leftovers(out)
    # The old layout: one checkpoint file (and history.csv) in the run folder.
    point = latest_point(out / "resume")
    shutil.move(point / P.CHECKPOINT, out / P.CHECKPOINT)
    shutil.move(point / "history.csv", out / "history.csv")
    shutil.rmtree(out / "resume")
    (out / ".checkpoint.safetensors.abcd1234.tmp").write_text("killed")
    assert _pretrain(micro_clip, out, stop_after=2) == full[:2]  # nothing to do but convert
    assert not (out / P.CHECKPOINT).exists() and not (out / "history.csv").exists()
    assert leftovers(out) == []
    assert _pretrain(micro_clip, out) == full
    assert files_of(out, PRETRAIN_FINAL) == expect
    digest = P.weights_from_checkpoint(out, tmp_path / "w.safetensors", dtype=torch.float16)
    assert digest == P.sha256(ref / "tiny_clip.safetensors")


def test_pretrain_refuses_a_point_of_another_config(micro_clip, tmp_path):
    _pretrain(micro_clip, tmp_path, stop_after=1)
    other = P.PretrainConfig(**{**PRETRAIN, "lr": 0.5})
    with pytest.raises(ValueError, match="another config"):
        _pretrain(other, tmp_path)
