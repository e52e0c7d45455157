"""Does the shipped tiny CLIP help? Pretrained vs random-init tower vs a colour baseline.

Issue 10's evidence. On the synthetic ``target`` domain (categories and backgrounds never seen
in pretraining or auxiliary training; defect kinds from the same generator as pretraining):

(a) **zero-shot**, training-free: last-block patch tokens through ``ln_post`` and the projection
    against the "normal"/"abnormal" prompt ensemble of pfl.clip.zeroshot ("object"), a two-way
    softmax per patch (WinCLIP/APRIL-GAN's start); image score: the CLS feature against the
    same text ("CLS") and the map's maximum ("max").
(b) **heads**: APRIL-GAN-style per-layer linear adapters (:class:`LayerAdapters`) on the 4
    tapped layers, trained briefly on the ``aux`` domain with focal + dice against the same
    text (logit scale 5, docs/reproduction.md, "Measured on this kind of machine"); map = mean
    over layers; image score: max.
(c) **colour**: distance of each pixel's RGB to the image's median colour; learns nothing.

Maps are blurred with sigma 3.46 px (8 px at 518, scaled) before the metrics (pfl.run.evaluate).
AUROC per category, then the mean over categories. Two uncertainties are printed: ``sd seeds``
(heads' init and order, and the random tower's init, across ``--seeds``) and ``s.e. data`` (a
bootstrap over test images within each category, the same resamples for every row).

    .venv/bin/python benchmarks/tiny_clip.py                       # default tower (tiny-v2)
    .venv/bin/python benchmarks/tiny_clip.py --tower plain=runs/plain/tiny_clip.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pfl.baselines.aprilgan import (
    LayerAdapters,
    pair_logit_diff,
    segmentation_loss,
    upsample_probs,
)
from pfl.clip.backbone import TINY_WEIGHTS, Backbone, load_weights
from pfl.clip.pretrain import init_clip
from pfl.clip.zeroshot import text_pair
from pfl.data.dataset import AnomalyDataset, collate
from pfl.data.preprocess import denormalize
from pfl.data.synthetic import ensure_benchmark
from pfl.run.evaluate import scaled_sigma, smooth_maps


@dataclass
class Encoded:
    """A domain split through one tower: what every method below needs, kept in memory."""

    patches: torch.Tensor  # (N, L, T, W) fp16, raw residual stream of the tapped layers
    zs_diff: torch.Tensor  # (N, T) zero-shot abnormal-minus-normal logit, last block
    cls_prob: torch.Tensor  # (N,) zero-shot CLS abnormal probability
    masks: torch.Tensor  # (N, S, S) bool
    labels: np.ndarray  # (N,)
    classes: list[str]


def encode(backbone: Backbone, ds: AnomalyDataset, batch: int = 32) -> Encoded:
    text = text_pair(backbone, "object")  # (2, E)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate)
    out = {k: [] for k in ("patches", "zs", "cls", "masks", "labels", "classes")}
    with torch.no_grad():
        for b in loader:
            f = backbone.encode_image(b["image"])
            tok = F.normalize(backbone.project_patches(f.patches[:, -1]), dim=-1)
            out["zs"].append((tok @ (text[1] - text[0])) / 0.07)
            g = F.normalize(f.global_, dim=-1)
            out["cls"].append(torch.softmax(100 * g @ text.T, dim=-1)[:, 1])
            out["patches"].append(f.patches.half())
            out["masks"].append(b["mask"] > 0.5)
            out["labels"].append(b["label"].numpy())
            out["classes"] += b["cls_name"]
    return Encoded(torch.cat(out["patches"]), torch.cat(out["zs"]), torch.cat(out["cls"]),
                   torch.cat(out["masks"]), np.concatenate(out["labels"]), out["classes"])


def colour_maps(ds: AnomalyDataset, batch: int = 64) -> tuple[np.ndarray, Encoded]:
    """(N, S, S) distance of each pixel to its image's median colour (RGB in [0, 1]), and the
    ground truth (an :class:`Encoded` without features)."""
    maps, masks, labels, classes = [], [], [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate)
    for b in loader:
        rgb = denormalize(b["image"])  # (n, S, S, 3)
        med = np.median(rgb.reshape(len(rgb), -1, 3), axis=1)[:, None, None]
        maps.append(np.linalg.norm(rgb - med, axis=-1))
        masks.append(b["mask"] > 0.5)
        labels.append(b["label"].numpy())
        classes += b["cls_name"]
    empty = torch.zeros(0)
    truth = Encoded(empty, empty, empty, torch.cat(masks), np.concatenate(labels), classes)
    return np.concatenate(maps).astype(np.float32), truth


def train_heads(backbone: Backbone, aux: Encoded, seed: int, steps: int, batch: int = 16,
                lr: float = 1e-3, scale: float = 5.0, loss_size: int = 112) -> LayerAdapters:
    """APRIL-GAN's per-layer linear adapters on the auxiliary domain (focal + dice per layer)."""
    g = torch.Generator().manual_seed(seed)
    n, n_layers, _, width = aux.patches.shape
    heads = LayerAdapters(n_layers, width, backbone.embed_dim, bias=True, generator=g)
    text = text_pair(backbone, "object")
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    masks = F.interpolate(aux.masks[:, None].float(), size=loss_size, mode="bilinear",
                          align_corners=False)[:, 0]
    masks = (masks >= 0.5).float()
    order = torch.randperm(n, generator=g)
    for step in range(steps):
        idx = order[(step * batch) % n:][:batch]
        if len(idx) < batch:
            order = torch.randperm(n, generator=g)
            idx = order[:batch]
        tokens = heads(aux.patches[idx].float())
        probs = upsample_probs(pair_logit_diff(tokens, text, scale), backbone.grid,
                               (loss_size, loss_size))
        focal, dice = segmentation_loss(probs, masks[idx])
        opt.zero_grad()
        (focal + dice).backward()
        opt.step()
    return heads.eval()


def head_diff(backbone: Backbone, heads: LayerAdapters, enc: Encoded,
              scale: float = 5.0) -> torch.Tensor:
    """(N, L, T) logit differences of trained heads."""
    text = text_pair(backbone, "object")
    with torch.no_grad():
        return torch.cat([pair_logit_diff(heads(p.float()), text, scale)
                          for p in enc.patches.split(64)])


def to_maps(diff: torch.Tensor, grid: tuple[int, int], size: int) -> np.ndarray:
    """(N, T) or (N, L, T) logit differences -> blurred (N, S, S) probability maps."""
    if diff.dim() == 2:
        diff = diff[:, None]
    maps = torch.cat([upsample_probs(d, grid, (size, size)).mean(1) for d in diff.split(64)])
    return smooth_maps(maps, scaled_sigma(8.0, size))


# --- metrics with a bootstrap over images ------------------------------------------------------
def weighted_auroc(inv: np.ndarray, n_groups: int, y: np.ndarray, w: np.ndarray) -> float:
    """AUROC with sample weights, ties counted half; ``inv`` ranks the scores into groups."""
    pos = np.bincount(inv, weights=w * y, minlength=n_groups)
    neg = np.bincount(inv, weights=w * (1 - y), minlength=n_groups)
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def category_aurocs(maps: np.ndarray | None, scores: np.ndarray, enc: Encoded,
                    weights: np.ndarray) -> np.ndarray:
    """(R, 2) pixel and image AUROC, mean over categories, for R image weightings.

    ``weights`` (R, N): multiplicity of each image in each bootstrap resample (row 0: ones).
    ``maps`` None: image AUROC only (pixel column NaN).
    """
    out = np.zeros((len(weights), 2))
    cats = sorted(set(enc.classes))
    for c in cats:
        idx = np.array([i for i, k in enumerate(enc.classes) if k == c])
        _, inv_i = np.unique(scores[idx], return_inverse=True)
        y_img = enc.labels[idx].astype(np.float64)
        if maps is not None:
            m = maps[idx].reshape(len(idx), -1)
            y = enc.masks[idx].reshape(len(idx), -1).numpy().ravel().astype(np.float64)
            _, inv = np.unique(m.ravel(), return_inverse=True)
            img_of_px = np.repeat(np.arange(len(idx)), m.shape[1])
        for r, w in enumerate(weights[:, idx]):
            out[r, 0] += (weighted_auroc(inv, inv.max() + 1, y, w[img_of_px])
                          if maps is not None else np.nan)
            out[r, 1] += weighted_auroc(inv_i, inv_i.max() + 1, y_img, w)
    return out / len(cats)


def bootstrap_weights(enc: Encoded, reps: int, seed: int = 0) -> np.ndarray:
    """(1 + reps, N) image multiplicities: row 0 all ones, then resamples within categories."""
    rng = np.random.default_rng(seed)
    w = np.zeros((reps + 1, len(enc.classes)))
    w[0] = 1
    for c in sorted(set(enc.classes)):
        idx = np.array([i for i, k in enumerate(enc.classes) if k == c])
        for r in range(1, reps + 1):
            # Normal and anomalous images resampled apart, so both stay present.
            for lab in (0, 1):
                part = idx[enc.labels[idx] == lab]
                np.add.at(w[r], rng.choice(part, size=len(part)), 1)
    return w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synthetic", help="synthetic benchmark root")
    ap.add_argument("--tower", action="append", default=None, metavar="NAME=PATH",
                    help=f"pretrained weights to compare (default: pretrained={TINY_WEIGHTS})")
    ap.add_argument("--random", action=argparse.BooleanOptionalAction, default=True,
                    help="include the random-init towers (one per seed)")
    ap.add_argument("--colour", action=argparse.BooleanOptionalAction, default=True,
                    help="include the median-colour baseline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--head-steps", type=int, default=150)
    ap.add_argument("--bootstrap", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", default=None, help="target classes, comma-separated (all)")
    ap.add_argument("--aux-classes", default=None, help="aux classes, comma-separated (all)")
    ap.add_argument("--csv", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    roots = ensure_benchmark(args.root)
    pick = lambda text: text.split(",") if text else None  # noqa: E731
    aux_ds = AnomalyDataset(roots["aux"], "train", pick(args.aux_classes), args.image_size)
    tgt_ds = AnomalyDataset(roots["target"], "test", pick(args.classes), args.image_size)
    towers = [t.split("=", 1) for t in (args.tower or [f"pretrained={TINY_WEIGHTS}"])
              if t != "none"]
    rows: list[tuple[str, str, np.ndarray]] = []  # (method, tower, (seeds, 1 + R, 2))
    seeds = list(range(args.seeds))
    state: dict = {}

    def zero_shot(bb: Backbone, tgt: Encoded) -> tuple[np.ndarray, np.ndarray]:
        zmap = to_maps(tgt.zs_diff, bb.grid, args.image_size)
        return (category_aurocs(zmap, zmap.reshape(len(zmap), -1).max(1), tgt, state["w"]),
                category_aurocs(None, tgt.cls_prob.numpy(), tgt, state["w"]))

    def heads(bb: Backbone, tgt: Encoded, aux: Encoded, s: int) -> np.ndarray:
        h = train_heads(bb, aux, seed=s, steps=args.head_steps)
        hmap = to_maps(head_diff(bb, h, tgt), bb.grid, args.image_size)
        print(f"  seed {s} done ({time.time() - t0:.0f} s)", file=sys.stderr)
        return category_aurocs(hmap, hmap.reshape(len(hmap), -1).max(1), tgt, state["w"])

    def add(name: str, zs: list, hs: list) -> None:
        rows.append(("zero-shot (map max)", name, np.stack([z[0] for z in zs])))
        rows.append(("zero-shot (CLS)", name, np.stack([z[1] for z in zs])))
        rows.append(("heads on aux (map max)", name, np.stack(hs)))

    def encode_both(bb: Backbone) -> tuple[Encoded, Encoded]:
        tgt = encode(bb, tgt_ds)
        if "w" not in state:
            state["w"], state["tgt"] = bootstrap_weights(tgt, args.bootstrap), tgt
        return tgt, encode(bb, aux_ds)

    for name, path in towers:
        clip = init_clip("pfl-tiny", args.image_size)
        load_weights(clip, Path(path))
        bb = Backbone(clip)
        tgt, aux = encode_both(bb)
        # The tower is fixed: zero-shot has no seed; the heads' init and order do.
        add(name, [zero_shot(bb, tgt)], [heads(bb, tgt, aux, s) for s in seeds])
    if args.random:
        zs, hs = [], []
        for s in seeds:
            bb = Backbone(init_clip("pfl-tiny", args.image_size, init_seed=s))
            tgt, aux = encode_both(bb)
            zs.append(zero_shot(bb, tgt))
            hs.append(heads(bb, tgt, aux, s))
        add("random init", zs, hs)
    if args.colour:
        # The bootstrap resamples depend on the labels alone, so split runs share them.
        cmap, truth = colour_maps(tgt_ds)
        # The bootstrap resamples depend on the labels alone, so split runs share them.
        state.setdefault("tgt", truth)
        state.setdefault("w", bootstrap_weights(truth, args.bootstrap))
        rows.append(("colour", "-", category_aurocs(cmap, cmap.reshape(len(cmap), -1).max(1),
                                                    truth, state["w"])[None]))
    tgt_enc = state["tgt"]

    n_img = len(tgt_enc.classes)
    n_cat = len(set(tgt_enc.classes))
    print(f"\nTarget domain: {n_cat} categories, {n_img} test images "
          f"({int(tgt_enc.labels.sum())} anomalous); seeds {args.seeds}; bootstrap "
          f"{args.bootstrap}; heads {args.head_steps} steps on aux; {time.time() - t0:.0f} s\n")
    print("| method | tower | pixel AUROC | sd seeds | s.e. data | image AUROC | sd seeds "
          "| s.e. data |")
    print("|---|---|---|---|---|---|---|---|")
    lines = []
    for method, tower, res in rows:
        cells = []
        for j in (0, 1):
            full = res[:, 0, j]
            if np.isnan(full).all():
                cells += ["-", "", ""]
                continue
            sd = f"{full.std(ddof=1):.3f}" if len(full) > 1 else "-"
            se = f"{res[:, 1:, j].std(axis=1, ddof=1).mean():.3f}" if res.shape[1] > 1 else "-"
            cells += [f"{full.mean():.3f}", sd, se]
        print(f"| {method} | {tower} | " + " | ".join(cells) + " |")
        lines.append(",".join([method, tower, *cells]))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        head = "method,tower,pixel_auroc,pixel_sd_seeds,pixel_se_data,image_auroc," \
               "image_sd_seeds,image_se_data"
        Path(args.csv).write_text("\n".join([head, *lines]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
