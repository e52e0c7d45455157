"""More than one process: sharded evaluation and DDP training with ``torch.distributed``.

Launch any ``pfl`` command with ``torchrun --nproc_per_node N -m pfl ...``; torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`session` joins the process group from them (``nccl`` when CUDA is available, else
``gloo``). Without those variables nothing is initialised and every helper here answers as
one process (rank 0 of 1), so a plain ``python -m pfl ...`` runs exactly as before.

Promise: N processes give the numbers of one process.

- Evaluation (:func:`prediction_block`, :func:`gather`): each rank predicts one contiguous,
  batch-aligned block of the store. The generator of the one-process run is first advanced
  past the earlier blocks (the method's ``skip_predict(n_images, generator)``), so every
  image gets the seed it gets in one process; the blocks are gathered in order on every rank,
  and metrics, tables and figures are computed from the same arrays: identical, not close.
- Training (:class:`Stepper`): every rank walks the same shuffled order and keeps its rows of
  each global batch (:func:`block`). Bayes-PFL draws its bank index and the seeds of the
  whole global batch and keeps its rows (``training_step(..., shard=Shard)``), so each image
  gets the noise it gets in one process. Every loss term of Bayes-PFL is a mean over the
  images of the batch (focal, dice, CE, flow, L_ort; with ``share_iad_samples`` the shared
  IAD term is the same on every rank); so the rank's loss is scaled by ``W * n_rank / n``
  (W processes, n images in the global batch, n_rank of them here) and DDP's gradient
  average, ``sum_rank n_rank / n * grad_rank``, is the global-batch gradient. Equal up to
  the order of the float sums (tests/test_distributed.py: parameters after one Adam step
  within 1e-6).
  A method without ``shard`` support gets its plain slice of the batch: equal only when its
  loss is a mean over images and it draws nothing per image (a warning says so).

Only rank 0 writes files (:func:`is_main`). A rank that dies makes the others fail at their
next collective (``gloo``: at once; ``nccl``: after the timeout, ``PFL_DIST_TIMEOUT``
seconds, default 1800), and torchrun stops the group; :class:`DistributedError` says what
failed. The last completed epoch is in ``<out>/resume``: rerun the same command to resume.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pfl.method.contract import Batch, Method, Shard

TIMEOUT_ENV = "PFL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
_OBJECT_GROUP = None  # a gloo group for Python objects (CPU), also when the main one is nccl


class DistributedError(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""


# --------------------------------------------------------------------------- process group


def launched() -> bool:
    """True when torchrun (or another launcher) set ``RANK`` and ``WORLD_SIZE``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def timeout() -> timedelta:
    """Collective timeout: ``$PFL_DIST_TIMEOUT`` seconds, default 30 minutes."""
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def is_main_env() -> bool:
    """Rank 0 by torchrun's ``RANK`` (after :func:`teardown` too); True without torchrun."""
    return int(os.environ.get("RANK", 0)) == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under nccl, else the CPU."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def place(method: Method) -> Method:
    """Move ``method`` (CLIP included) to this rank's device: ``cuda:LOCAL_RANK`` under nccl,
    where DDP needs its parameters; unchanged on the CPU (one process, gloo)."""
    dev = device()
    if dev.type != "cpu" and callable(getattr(method, "to", None)):
        method.to(dev)
    return method


def init(backend_name: str | None = None) -> bool:
    """Join the process group from torchrun's environment; False (and nothing done) without it."""
    global _OBJECT_GROUP
    if initialized():
        return True
    if not launched():
        return False
    name = backend_name or backend()
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(name, timeout=timeout())
    _OBJECT_GROUP = (dist.new_group(backend="gloo", timeout=timeout()) if name != "gloo"
                     else dist.group.WORLD)
    return True


def teardown() -> None:
    global _OBJECT_GROUP
    if initialized():
        dist.destroy_process_group()
    _OBJECT_GROUP = None


@contextmanager
def session(backend_name: str | None = None):
    """``init`` on entry (when launched), ``teardown`` on exit; yields whether distributed."""
    started = not initialized() and init(backend_name)
    try:
        yield initialized()
    finally:
        if started:
            teardown()


@contextmanager
def guard(what: str):
    """Turn a failed collective into a :class:`DistributedError` that says what to do."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not initialized() or isinstance(e, DistributedError):
            raise
        raise DistributedError(
            f"rank {rank()}/{world_size()}: {what} failed ({type(e).__name__}: {e}). Another "
            f"process stopped or did not answer within {timeout()} (${TIMEOUT_ENV}). Training "
            "keeps the last completed epoch in <out>/resume: rerun the same torchrun command "
            "to resume."
        ) from e


def barrier() -> None:
    if world_size() > 1:
        with guard("barrier"):
            dist.barrier(group=_OBJECT_GROUP)


def all_gather(obj) -> list:
    """``obj`` of every rank, in rank order (pickled, over gloo on the CPU)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    with guard("all_gather_object"):
        dist.all_gather_object(out, obj, group=_OBJECT_GROUP)
    return out


# --------------------------------------------------------------------------- sharding


def block(n: int, rank_: int | None = None, world: int | None = None, align: int = 1) -> range:
    """This rank's contiguous share of ``range(n)``, cut at multiples of ``align``.

    The ``ceil(n / align)`` units are split as evenly as possible, earlier ranks taking the
    remainder; a rank may get an empty range.

    >>> [list(block(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [(b.start, b.stop) for b in (block(10, r, 3, align=4) for r in range(3))]
    [(0, 4), (4, 8), (8, 10)]
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    units = -(-n // align)
    base, extra = divmod(units, world)
    start = rank_ * base + min(rank_, extra)
    stop = start + base + (rank_ < extra)
    return range(min(n, start * align), min(n, stop * align))


def prediction_block(method: Method, store, batch_size: int, generator: torch.Generator):
    """This rank's batch-aligned block of ``store`` for prediction, with ``generator`` (and the
    method's state) advanced past the earlier blocks exactly as one process would have.

    Returns ``store`` itself in one process.
    """
    if world_size() == 1:
        return store
    rows = block(len(store), align=batch_size)
    skipped = range(0, rows.start, batch_size)
    skip = getattr(method, "skip_predict", None)
    for start in skipped:
        if skip is None:
            break  # checked after prediction by check_no_draws
        skip(min(batch_size, rows.start - start), generator)
    return store.select(list(rows))


def check_no_draws(method: Method, state_before: torch.Tensor, generator: torch.Generator
                   ) -> None:
    """A method without ``skip_predict`` must not draw from the generator in ``predict``,
    else its sharded evaluation would differ from one process."""
    if (world_size() > 1 and getattr(method, "skip_predict", None) is None
            and not torch.equal(state_before, generator.get_state())):
        raise ValueError(
            f"{method.name}.predict draws from its generator but has no skip_predict("
            "n_images, generator) hook, so its evaluation cannot be split over processes "
            "with the numbers of one process; add the hook or run with one process")


def gather(part, concat):
    """Every rank's ``part`` (None when its block was empty), concatenated in rank order by
    ``concat(list_of_parts)``; in one process ``part`` itself."""
    if world_size() == 1:
        return part
    return concat([p for p in all_gather(part) if p is not None])


# --------------------------------------------------------------------------- training


def _supports_shard(method: Method) -> bool:
    return "shard" in inspect.signature(method.training_step).parameters


class _TrainableModule(nn.Module):
    """The trainable parameters of a method as one module, for DDP; ``forward`` is the
    method's ``training_step``. The method is not a submodule, so the frozen CLIP is neither
    broadcast nor bucketed."""

    def __init__(self, method: Method):
        super().__init__()
        self.params = nn.ParameterList(
            [p for p in method.trainable_parameters() if p.requires_grad])
        self._method = (method,)

    def forward(self, batch: Batch, generator: torch.Generator, shard: Shard | None):
        method = self._method[0]
        if len(batch) == 0 and shard is None:  # nothing here: a zero that reaches every grad
            return sum(p.sum() for p in self.params) * 0.0, {}
        if shard is None:
            loss = method.training_step(batch, generator)
        else:
            loss = method.training_step(batch, generator, shard=shard)
        return loss.total, loss.terms


class Stepper:
    """The training steps of one process, or of this rank of a DDP group.

    One process: ``store.batches`` and ``method.training_step`` as always. Several: this
    rank's rows of every global batch, the method wrapped in DDP, the loss scaled so that the
    averaged gradient is the global-batch gradient, and the logged terms the global means.
    """

    def __init__(self, method: Method):
        self.method = method
        self.ddp = None
        if world_size() > 1:
            if not _supports_shard(method) and is_main():
                warnings.warn(
                    f"{method.name}.training_step takes no shard=: each rank trains on its "
                    "slice of the batch with its own draws, which equals one process only if "
                    "the loss is a mean over images and nothing is drawn per image",
                    stacklevel=2)
            module = _TrainableModule(place(method))
            with guard("DDP set-up"):
                self.ddp = DistributedDataParallel(module, device_ids=None)

    def steps(self, store, batch_size: int, order: torch.Generator,
              step_gen: torch.Generator, with_images: bool
              ) -> Iterator[tuple[Batch, torch.Tensor, dict[str, float]]]:
        """``(batch, loss, terms)`` per step: ``loss.backward()`` via :meth:`backward`;
        ``terms`` holds ``total`` and every term of the global batch."""
        if self.ddp is None:
            for batch in store.batches(batch_size, shuffle=True, generator=order,
                                       with_images=with_images):
                loss = self.method.training_step(batch, step_gen)
                yield batch, loss.total, {"total": float(loss.total.detach()), **loss.terms}
            return
        n = len(store)
        perm = torch.randperm(n, generator=order)  # store.batches' shuffle, then cut
        shardable = _supports_shard(self.method)
        world = world_size()
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size].tolist()
            mine = block(len(idx))
            part = store.select([idx[i] for i in mine])
            batch = (next(iter(part.batches(len(mine), with_images=with_images)))
                     if len(mine) else Batch(cls_names=[]))
            shard = Shard(mine.start, mine.stop, len(idx)) if shardable else None
            total, terms = self.ddp(batch, step_gen, shard)
            shares = all_gather((len(mine), {"total": float(total.detach()), **terms}))
            scaled = total * (len(mine) * world / len(idx))
            yield batch, scaled, _weighted_terms(shares, len(idx))

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; under DDP the gradients are averaged over the ranks here."""
        if self.ddp is None:
            loss.backward()
            return
        with guard("DDP gradient all-reduce"):
            loss.backward()


def _weighted_terms(shares: list[tuple[int, dict[str, float]]], total: int) -> dict[str, float]:
    """The global-batch value of every logged term: the rank means weighted by their rows.

    >>> _weighted_terms([(3, {"a": 1.0}), (1, {"a": 5.0}), (0, {})], 4)
    {'a': 2.0}
    """
    keys = next(t for k, t in shares if k).keys()
    return {key: sum(k * t[key] for k, t in shares if k) / total for key in keys}
