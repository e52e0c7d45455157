"""Anomaly maps from patch-level logit differences, fused: upsample -> sigmoid -> mean.

docs/reproduction.md, "Maps, scores and losses": the abnormal probability of one (normal,
abnormal) prompt pair at one layer is ``sigmoid(up(d))``, ``d`` the abnormal minus normal pixel
logit on the ``h x w`` patch grid and ``up`` bilinear upsampling to the ``H x W`` image; the
anomaly map is the mean over layers and the ``M = B x R`` pairs. The sigmoid is not linear, so
the mean cannot move before the upsampling: every pair needs its own full-resolution
probabilities. Stored, they are ``L x M x H x W`` values per image (4 x 30 x 518 x 518 = 32 M at
518 px), and producing, storing and re-reading them was most of Bayes-PFL's inference time on a
CPU.

:func:`fused_maps` never stores them. Bilinear upsampling is separable and local: with the
``(W, w)`` interpolation matrix ``A_w`` (two non-zeros a row) the columns are upsampled once on
the patch grid, ``Y = d A_w^T`` (``h x W`` per pair, small), and output row ``i`` is
``Y[k_i] + lambda_i (Y[k_i + 1] - Y[k_i])``. Output rows are processed in blocks; a block's
pair probabilities are made (on a CPU: one multiply-add per block of rows that share their
source rows; elsewhere one matmul with the block's rows of ``A_h``), passed through the
sigmoid and reduced (mean over pairs per layer; optionally the per-sample maps' spread) while
they are still in cache, then dropped. The result equals :func:`mean_sigmoid_reference` to rounding
(tested: 1e-6 in float32, 1e-12 in float64).

The per-pixel uncertainty :attr:`FusedMaps.sample_std` is the standard deviation over the R
Monte Carlo samples of the per-sample map (sample r's map: mean over layers and the B bank
prompts of its pairs ``m = b R + r``), i.e. how much the prompt-flow draws disagree at that
pixel. It comes from the same blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one block of pair probabilities. CPU: small enough to stay in L2 (one image's
# 4 layers x 30 pairs x ~14 rows x 224 columns is ~376 k values). GPU: large enough that a few
# dozen launches cover a batch, small enough that no batch-sized buffer appears.
CPU_BLOCK = 2**19
GPU_BLOCK = 2**23


@dataclass
class FusedMaps:
    """What :func:`fused_maps` gives for ``diff (N, L, M, h, w)``.

    Attributes:
        layer_maps: ``(N, L, H, W)`` mean over the M pairs of ``sigmoid(up(diff))``.
        sample_std: ``(N, H, W)`` standard deviation over the R samples of the per-sample map
            (population form, divisor R; zero for R = 1), or None when not asked for.
        sample_maps: ``(N, R, H, W)`` the per-sample maps themselves (``keep_samples``), else
            None: their mean over R is the anomaly map, their spread ``sample_std``.
    """

    layer_maps: Tensor
    sample_std: Tensor | None = None
    sample_maps: Tensor | None = None


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool = False,
                         dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    """``(n_out, n_in)`` matrix of 1-D linear interpolation, as ``F.interpolate`` computes it.

    Source coordinate of output ``i``: ``(i + 0.5) n_in / n_out - 0.5`` clamped at 0
    (``align_corners=False``), or ``i (n_in - 1) / (n_out - 1)`` (``align_corners=True``);
    weights ``1 - lambda`` and ``lambda`` on the two neighbouring inputs. Built in float64.
    """
    k0, k1, lam = _source_rows(n_in, n_out, align_corners)
    rows = torch.arange(n_out)
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    mat.index_put_((rows, k0), 1 - lam, accumulate=True)
    mat.index_put_((rows, k1), lam, accumulate=True)
    return mat.to(dtype=dtype or torch.get_default_dtype(), device=device)


def _source_rows(n_in: int, n_out: int, align_corners: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Lower source index ``k0``, upper ``k1`` and weight ``lambda`` of every output index."""
    i = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(i)
    else:
        src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    k0 = src.floor().long().clamp(max=n_in - 1)
    k1 = (k0 + 1).clamp(max=n_in - 1)
    return k0, k1, src - k0


def mean_sigmoid_reference(diff: Tensor, size: tuple[int, int],
                           align_corners: bool = False) -> Tensor:
    """Plain ``mean_m sigmoid(up(diff[..., m, :, :]))``: ``(..., M, h, w) -> (..., H, W)``.

    Every pair's full-resolution map is made at once; the reference for :func:`fused_maps`.
    """
    *lead, m, h, w = diff.shape
    up = F.interpolate(diff.reshape(-1, m, h, w), size=size, mode="bilinear",
                       align_corners=align_corners)
    return up.sigmoid().mean(1).reshape(*lead, *size)


def sample_std_reference(diff: Tensor, size: tuple[int, int], n_samples: int,
                         align_corners: bool = False) -> Tensor:
    """Per-sample loop: for each r the map ``mean_{l, b} sigmoid(up(diff[:, l, b R + r]))``,
    then the standard deviation over r (divisor R). ``(N, L, M, h, w) -> (N, H, W)``."""
    n, n_layers, m = diff.shape[:3]
    per_sample = []
    for r in range(n_samples):
        pairs = diff[:, :, r::n_samples]  # bank-major order: pair b R + r for b = 0..B-1
        per_sample.append(mean_sigmoid_reference(pairs, size, align_corners).mean(1))
    return torch.stack(per_sample).std(0, correction=0)


def _row_blocks(k0: list[int], rows_per_block: int) -> list[tuple[int, int]]:
    """Blocks ``[i, j)`` of at most ``rows_per_block`` output rows (at least one row).

    A run of rows with the same source row ``k0`` is cut into pieces when it is longer; short
    runs are merged while they fit.
    """
    starts = [0] + [i for i in range(1, len(k0)) if k0[i] != k0[i - 1]] + [len(k0)]
    pieces = [(i, min(i + rows_per_block, b)) for a, b in zip(starts[:-1], starts[1:])
              for i in range(a, b, rows_per_block)]
    blocks = [pieces[0]]
    for i, j in pieces[1:]:
        if j - blocks[-1][0] <= rows_per_block:
            blocks[-1] = (blocks[-1][0], j)
        else:
            blocks.append((i, j))
    return blocks


def fused_maps(diff: Tensor, size: tuple[int, int], align_corners: bool = False,
               n_samples: int | None = None, block_elements: int | None = None,
               row_step: str | None = None, keep_samples: bool = False) -> FusedMaps:
    """Per-layer maps (and optionally the per-sample spread) without per-pair maps in memory.

    Args:
        diff: ``(N, L, M, h, w)`` abnormal minus normal pixel logits; pairs ordered bank-major
            (``m = b R + r``).
        size: ``(H, W)`` output size.
        align_corners: as ``F.interpolate`` (``official_compat`` uses True).
        n_samples: R; when given, also :attr:`FusedMaps.sample_std` (M must be a multiple).
        block_elements: pair probabilities per block (default :data:`CPU_BLOCK` on a CPU,
            :data:`GPU_BLOCK` otherwise). Changes speed and memory only (tested).
        row_step: how output rows are made from the column-upsampled rows: ``"lerp"`` (one
            multiply-add where a block shares its source rows; fastest on a CPU) or
            ``"matmul"`` (one matmul per block; fewest launches on a GPU). None: by device.
            Changes speed only (tested).
        keep_samples: also store :attr:`FusedMaps.sample_maps` (needs ``n_samples``; R full
            maps per image, for teaching the Monte Carlo estimate, notebook 03b).

    Returns:
        :class:`FusedMaps`; ``layer_maps.mean(1)`` is the anomaly map.
    """
    _check_inputs("fused_maps", diff, n_samples, keep_samples)
    on_cpu = diff.device.type == "cpu"
    budget = block_elements or (CPU_BLOCK if on_cpu else GPU_BLOCK)
    if row_step not in (None, "lerp", "matmul"):
        raise ValueError(f"fused_maps: row_step {row_step!r}: use 'lerp', 'matmul' or None")
    lerp = on_cpu if row_step is None else row_step == "lerp"
    # In diff's own dtype even under torch.autocast (which would run the matmul in half).
    with torch.autocast(device_type=diff.device.type, enabled=False):
        return _fused_maps(diff, size, align_corners, n_samples, budget, lerp, keep_samples)


def _check_inputs(who: str, diff: Tensor, n_samples: int | None, keep_samples: bool) -> None:
    """The shape and sample-count checks that :func:`fused_maps` and :func:`compiled_maps` share."""
    if diff.dim() != 5:
        raise ValueError(f"{who}: diff must be (N, L, M, h, w), got {tuple(diff.shape)}")
    m = diff.shape[2]
    if n_samples is not None and (n_samples < 1 or m % n_samples):
        raise ValueError(f"{who}: {m} pairs are not B x R for R = {n_samples}")
    if keep_samples and n_samples is None:
        raise ValueError(f"{who}: keep_samples needs n_samples (R)")


def _fused_maps(diff: Tensor, size: tuple[int, int], align_corners: bool,
                n_samples: int | None, budget: int, lerp: bool,
                keep_samples: bool = False) -> FusedMaps:
    n, n_layers = diff.shape[:2]
    H, W = size
    # Under autograd (training) the blocks are concatenated: a slice assignment's backward
    # copies the whole gradient each time (a quarter of a training step), a concatenation's
    # only slices it. Without autograd (inference) every block is made in one reused buffer and
    # reduced straight into preallocated outputs (~18 % less map time than concatenating).
    if torch.is_grad_enabled() and diff.requires_grad:
        parts = [], [], []  # maps, std, samples: (n', ..., rows, W) per block
        for n0, _, _, _, z in _probability_blocks(diff, size, align_corners, budget, lerp):
            for part, value in zip(parts, _reduce_block(z, n_samples, keep_samples)):
                if value is not None:
                    part.append((n0, value))
        maps, std, samples = (_concat(part) for part in parts)
        return FusedMaps(maps, std, samples)
    maps = diff.new_empty(n, n_layers, H, W)
    std = diff.new_empty(n, H, W) if n_samples is not None else None
    samples = diff.new_empty(n, n_samples, H, W) if keep_samples else None
    for n0, n1, i, j, z in _probability_blocks(diff, size, align_corners, budget, lerp,
                                               reuse=True):
        torch.mean(z, 2, out=maps[n0:n1, :, i:j])
        if std is not None:
            per_sample = _per_sample(z, n_samples)
            torch.var(per_sample, 1, correction=0, out=std[n0:n1, i:j]).sqrt_()
            if samples is not None:
                samples[n0:n1, :, i:j] = per_sample
    return FusedMaps(maps, std, samples)


def _reduce_block(z: Tensor, n_samples: int | None, keep_samples: bool):
    """(mean over pairs, spread over samples or None, per-sample maps or None) of one block."""
    if n_samples is None:
        return z.mean(2), None, None
    per_sample = _per_sample(z, n_samples)
    return z.mean(2), per_sample.var(1, correction=0).sqrt_(), per_sample if keep_samples else None


def _per_sample(z: Tensor, n_samples: int) -> Tensor:
    """Sample r's map (mean over layers and the B pairs ``b R + r``) of a block ``z``."""
    return z.unflatten(2, (z.shape[2] // n_samples, n_samples)).mean((1, 2))


def _concat(blocks: list[tuple[int, Tensor]]) -> Tensor | None:
    """Blocks in (image group, row) order -> one tensor: rows within a group, then groups."""
    if not blocks:
        return None
    groups: dict[int, list[Tensor]] = {}
    for n0, value in blocks:
        groups.setdefault(n0, []).append(value)
    return torch.cat([torch.cat(rows, -2) for rows in groups.values()])


def _probability_blocks(diff: Tensor, size: tuple[int, int], align_corners: bool, budget: int,
                        lerp: bool, reuse: bool = False):
    """Yield ``(n0, n1, i, j, z)``: ``z (n1 - n0, L, M, j - i, W)`` = the pair probabilities
    ``sigmoid(up(diff))`` of images ``n0:n1`` and output rows ``i:j``. ``reuse``: every ``z``
    lives in one buffer, valid until the next block is made."""
    n, n_layers, m, h, w = diff.shape
    H, W = size
    dev, dt = diff.device, diff.dtype
    a_w = interpolation_matrix(w, W, align_corners, dt, dev)
    a_h = interpolation_matrix(h, H, align_corners, dt, dev)
    k0, _, lam = _source_rows(h, H, align_corners)
    k0 = k0.tolist()
    lam = lam.to(dtype=dt, device=dev)

    per_row = n_layers * m * W  # pair probabilities of one output row of one image
    if per_row * H <= budget:  # whole images per block
        images, rows = max(1, budget // (per_row * H)), H
    else:
        images, rows = 1, max(1, budget // per_row)
    buffer = diff.new_empty(images * per_row * rows) if reuse else None
    for n0 in range(0, n, images):
        n1 = min(n, n0 + images)
        # Columns first, on the patch grid: Y (n', L, M, h, W).
        y = diff[n0:n1] @ a_w.T
        if lerp:  # output row i = Y[k] + lambda_i (Y[k + 1] - Y[k]); zero step on the last row
            dy = torch.cat([y[..., 1:, :] - y[..., :-1, :], torch.zeros_like(y[..., :1, :])], -2)
        for i, j in _row_blocks(k0, rows):
            shape = (*y.shape[:3], j - i, W)
            out = buffer[:math.prod(shape)].view(shape) if reuse else None
            if lerp and k0[i] == k0[j - 1]:
                # One source row pair: one broadcast multiply-add (fewest memory passes).
                k = k0[i]
                z = torch.addcmul(y[..., k:k + 1, :], lam[i:j, None], dy[..., k:k + 1, :], out=out)
            else:
                # Rows of A_h restricted to the source rows they touch: one matmul.
                lo, hi = k0[i], min(h, k0[j - 1] + 2)
                z = torch.matmul(a_h[i:j, lo:hi], y[..., lo:hi, :], out=out)
            yield n0, n1, i, j, z.sigmoid_()


def compiled_maps(diff: Tensor, size: tuple[int, int], align_corners: bool = False,
                  n_samples: int | None = None, keep_samples: bool = False) -> FusedMaps:
    """:func:`fused_maps` as one compiled kernel (``torch.compile``, inductor); inference only.

    The same algebra, written as if every pair's map were made (``sigmoid`` of each output
    row's two source rows of ``Y = d A_w^T``, then the means), which inductor turns into one
    loop nest: per output pixel the M pair probabilities are made, squashed and summed in
    registers, so not even a block of them is stored. On a CPU that removes the block's three
    memory passes (multiply-add, sigmoid, mean) of :func:`fused_maps`; the sigmoids remain.
    Measured with ``benchmarks/inference.py --compiled-maps`` (README, Table A.3).

    Needs what inductor needs: a C++ compiler on a CPU (gcc or clang) and a vector ISA (its
    scalar code for this kernel does not compile in torch 2.14), Triton on a GPU. Each
    new input shape compiles once per process (5-40 s on a 2-core CPU), later calls reuse it.
    Equals :func:`fused_maps` to rounding (tested: 1e-6 in float32), not bit for bit: the
    notebooks and training use :func:`fused_maps`. Arguments and result as :func:`fused_maps`.
    """
    if torch.is_grad_enabled() and diff.requires_grad:
        raise ValueError("compiled_maps is for inference (no autograd): use fused_maps to train")
    _check_inputs("compiled_maps", diff, n_samples, keep_samples)
    if diff.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise RuntimeError(
            "compiled_maps: under ATen's scalar CPU dispatch (ATEN_CPU_CAPABILITY=default, or a "
            f"CPU without AVX2) inductor in torch {torch.__version__} writes C++ that does not "
            "compile; use map_kernel='fused' (the default) here")
    h, w = diff.shape[-2:]
    H, W = size
    a_w = interpolation_matrix(w, W, align_corners, diff.dtype, diff.device)
    k0, k1, lam = _source_rows(h, H, align_corners)
    kernel = _compiled_kernel(n_samples, keep_samples)
    with torch.autocast(device_type=diff.device.type, enabled=False):
        maps, std, samples = kernel(diff, a_w, k0.to(diff.device), k1.to(diff.device),
                                    lam.to(dtype=diff.dtype, device=diff.device))
    return FusedMaps(maps, std, samples)


@functools.cache
def _compiled_kernel(n_samples: int | None, keep_samples: bool):
    """The compiled kernel for one (R, keep_samples); compiled at its first call per shape."""
    return torch.compile(functools.partial(_maps_kernel, n_samples=n_samples,
                                           keep_samples=keep_samples), dynamic=False)


def _maps_kernel(diff: Tensor, a_w: Tensor, k0: Tensor, k1: Tensor, lam: Tensor,
                 n_samples: int | None, keep_samples: bool):
    """Eager meaning of :func:`compiled_maps` (it would store every pair's map: compile it)."""
    y = diff @ a_w.T  # (N, L, M, h, W): columns upsampled on the patch grid
    lam = lam[:, None]
    z = torch.sigmoid(y[..., k0, :] * (1 - lam) + y[..., k1, :] * lam)  # (N, L, M, H, W)
    if n_samples is None:
        return z.mean(2), None, None
    per_sample = _per_sample(z, n_samples)
    std = per_sample.var(1, correction=0).sqrt()
    return z.mean(2), std, per_sample if keep_samples else None
