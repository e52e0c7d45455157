"""pfl.run.distributed: N processes give the numbers of one.

Fast checks in one process (the maths: shards of a batch weighted by their rows give the
global-batch gradient; a skipped block leaves the generator where one process has it), and one
check with 2 ``gloo`` processes (torch.multiprocessing): the sharded evaluation writes the same
tables as one process, byte for byte, and DDP training ends within 1e-6 of one process.
"""

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _toy import ToyMethod, toy_store
from safetensors.torch import load_file

from pfl.clip.backbone import TINY_WEIGHTS, Backbone, ImageFeatures
from pfl.config import BackboneConfig, EvalConfig, ModelConfig, TrainConfig
from pfl.method.contract import Shard
from pfl.method.model import BayesPFL
from pfl.run import distributed
from pfl.run.evaluate import evaluate_all, predict_store
from pfl.run.features import FeatureStore
from pfl.run.train import fit

pytestmark = pytest.mark.skipif(not TINY_WEIGHTS.is_file(),
                                reason="needs the shipped tiny CLIP weights")

MODEL = ModelConfig(n_prompts=2, n_ctx=2, n_state=2, flow_length=2, mc_train=2, mc_test=2)
TRAIN = TrainConfig(epochs=1, batch_size=7, seed=5)  # lr 1e-4 (paper)
EVAL = EvalConfig(batch_size=3, sigma=1.0, seed=2)
NAMES = ["bottle", "pcb1", "metal_nut"]


def _backbone() -> Backbone:
    return Backbone.from_config(BackboneConfig(model_name="pfl-tiny", image_size=56))


def _store(backbone: Backbone, n: int, seed: int) -> FeatureStore:
    """``n`` random images through the tiny tower, every other one with a defect square."""
    g = torch.Generator().manual_seed(seed)
    S = backbone.image_size
    with torch.no_grad():
        f = backbone.encode_image(torch.randn(n, 3, S, S, generator=g))
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    for i in range(1, n, 2):
        r, c = torch.randint(0, S - 12, (2,), generator=g).tolist()
        masks[i, r:r + 12, c:c + 12] = 1
    return FeatureStore(ImageFeatures(f.global_, f.patches), masks=masks,
                        labels=torch.arange(n) % 2, cls_names=[NAMES[i % 3] for i in range(n)],
                        paths=[f"img/{i:03d}.png" for i in range(n)])


def _grads(model: BayesPFL) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- one process


def test_block_partitions_in_order_and_aligned():
    for n, world, align in [(10, 3, 4), (5, 2, 1), (1, 2, 1), (17, 4, 3), (0, 2, 2)]:
        blocks = [distributed.block(n, r, world, align) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert all(b.start % align == 0 for b in blocks if len(b))


@pytest.mark.parametrize("share", [False, True])
def test_shards_weighted_by_rows_give_the_global_batch_gradient(share):
    """What DDP computes, in one process: rows 0:4 and 4:7 (and an empty shard) of a batch of
    7, each loss scaled by its share of rows, sum to the whole batch's loss and gradient."""
    backbone = _backbone()
    batch = next(_store(backbone, 7, seed=0).batches(7))
    cfg = dataclasses.replace(MODEL, share_iad_samples=share)
    model = BayesPFL(backbone, cfg, seed=0).train()
    whole = model.training_step(batch, torch.Generator().manual_seed(9))
    whole.total.backward()
    want = _grads(model)
    model.zero_grad()
    total = 0.0
    for rows in (range(0, 4), range(4, 7), range(7, 7)):
        part = next(_store(backbone, 7, seed=0).select(list(rows)).batches(7), None)
        part = part if part is not None else dataclasses.replace(batch, cls_names=[])
        loss = model.training_step(part, torch.Generator().manual_seed(9),
                                   shard=Shard(rows.start, rows.stop, 7))
        (loss.total * len(rows) / 7).backward()
        total += float(loss.total.detach()) * len(rows) / 7
    assert total == pytest.approx(float(whole.total.detach()), rel=1e-6)
    got = _grads(model)
    assert got.keys() == want.keys()
    for k in want:
        # float32: shards sum the images in another order (1e-5 of the tensor's largest entry)
        atol = 1e-5 * float(want[k].abs().max()) + 1e-9
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")
    # Each image's noise comes from the step's seed and its content (pfl.method.sampling), so a
    # shard needs no seeds of the other rows: the plain step on the same rows is the same. The
    # test can fail: another step seed gives another loss.
    model.zero_grad()
    part = next(_store(backbone, 7, seed=0).select([4, 5, 6]).batches(7))
    plain = model.training_step(part, torch.Generator().manual_seed(9))
    right = model.training_step(part, torch.Generator().manual_seed(9), shard=Shard(4, 7, 7))
    other = model.training_step(part, torch.Generator().manual_seed(10), shard=Shard(4, 7, 7))
    assert float(plain.total.detach()) == float(right.total.detach())
    assert float(other.total.detach()) != float(right.total.detach())


@pytest.mark.parametrize("share", [False, True])
def test_skip_predict_leaves_the_generator_where_one_process_has_it(share):
    backbone = _backbone()
    store = _store(backbone, 7, seed=1)
    model = BayesPFL(backbone, dataclasses.replace(MODEL, share_iad_samples=share), seed=0).eval()
    full = predict_store(model, store, EVAL)
    model.train(False)  # forgets the shared IAD noise
    gen = torch.Generator().manual_seed(EVAL.seed)
    model.skip_predict(3, gen)
    model.skip_predict(3, gen)
    with torch.no_grad():
        tail = model.predict(next(store.select([6]).batches(3)), gen)
    raw = predict_store(model, store, dataclasses.replace(EVAL, sigma=0.0))
    torch.testing.assert_close(tail.maps[0].numpy(), raw.maps[6], rtol=0, atol=0)
    assert float(tail.scores[0]) == raw.scores[6] == pytest.approx(full.scores[6])


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(out: Path) -> None:
    """The same job in one process or on every rank: train Bayes-PFL, evaluate three methods."""
    backbone = _backbone()
    train, target = _store(backbone, 8, seed=3), _store(backbone, 10, seed=4)
    model = BayesPFL(backbone, MODEL, seed=0, train_cfg=TRAIN)
    # One Adam step on a global batch of 7 images, split 4 + 3 over 2 ranks.
    fit(model, train, dataclasses.replace(TRAIN, max_steps_per_epoch=1), out / "run",
        progress=False)
    # Evaluation of fixed weights (the trained ones differ by float rounding).
    fresh = BayesPFL(backbone, MODEL, seed=1)
    shared = BayesPFL(backbone, dataclasses.replace(MODEL, share_iad_samples=True), seed=1)
    for name, method, store in (("pfl", fresh, target), ("shared", shared, target),
                                ("toy", ToyMethod(), toy_store(["a", "b"], 5))):
        evaluate_all(method, {"target": store}, EVAL, out_dir=out / name, progress=False)


def _die_after_first_epoch(history, row):
    if distributed.rank() == 1:
        os._exit(3)  # a killed rank: no clean-up, no message


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **{distributed.TIMEOUT_ENV: "60"})
    torch.set_num_threads(1)
    out = Path(out)
    with distributed.session("gloo"):
        assert distributed.world_size() == world
        _job(out)
        # Rank 1 dies after epoch 1 of 2 (steps of 7 = 4 + 3 and 1 = 1 + 0 images): rank 0
        # must stop with a message, not hang.
        backbone = _backbone()
        model = BayesPFL(backbone, MODEL, seed=0, train_cfg=TRAIN)
        try:
            fit(model, _store(backbone, 8, seed=3), dataclasses.replace(TRAIN, epochs=2),
                out / "killed", progress=False, callbacks=[_die_after_first_epoch])
        except distributed.DistributedError as e:
            (out / "message.txt").write_text(str(e))


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _job(one)
    # fork, not spawn: a spawned child re-imports torch and pfl (~12 s of CPU each on a 2-core
    # machine), a forked one starts from this process's modules; the job is the same.
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(two)), nprocs=2, join=False,
                             start_method="fork")
    for p in ctx.processes:  # not ctx.join(): it would end rank 0 as soon as rank 1 dies
        p.join(timeout=600)
    assert [p.exitcode for p in ctx.processes] == [0, 3]

    # Evaluation: every table, CSV and figure CSV byte for byte.
    files = sorted(p.relative_to(one) for p in one.rglob("*")
                   if p.is_file() and p.suffix in (".csv", ".md") and "run" not in p.parts)
    assert len(files) > 10
    for f in files:
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    # Training: the parameters after one Adam step, within 1e-6 (measured 3.2e-7 here, float32
    # sums in another order; Adam's first step, g / (|g| + eps), amplifies the rounding of
    # gradients near eps).
    a = load_file(str(one / "run" / "checkpoint.safetensors"))
    b = load_file(str(two / "run" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    init = BayesPFL(_backbone(), MODEL, seed=0).trainable_state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
        moved = max(moved, float((a[k].float() - init[k].float()).abs().max()))
    assert moved > 5e-5  # the step did change the parameters (lr 1e-4)

    # The killed run: a clear message on rank 0, and it resumes (here in one process) from
    # epoch 1 to the end of an uninterrupted one-process run (4 steps: within 1e-5).
    message = (two / "message.txt").read_text()
    assert "rank 0/2" in message and "resume" in message
    backbone = _backbone()
    cfg = dataclasses.replace(TRAIN, epochs=2)
    resumed = BayesPFL(backbone, MODEL, seed=0, train_cfg=TRAIN)
    history = fit(resumed, _store(backbone, 8, seed=3), cfg, two / "killed", progress=False)
    assert [r["epoch"] for r in history.epochs] == [1, 2]
    whole = BayesPFL(backbone, MODEL, seed=0, train_cfg=TRAIN)
    fit(whole, _store(backbone, 8, seed=3), cfg, one / "whole", progress=False)
    for k, v in whole.trainable_state_dict().items():
        torch.testing.assert_close(resumed.trainable_state_dict()[k], v, rtol=0, atol=1e-5,
                                   msg=k)
