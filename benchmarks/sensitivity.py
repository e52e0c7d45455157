"""How chaotic is smoke-profile training? A perturbation of 1e-12 against its growth.

Trains Bayes-PFL twice from the same seed on the same batches (4 + 4 images per auxiliary
category, batch 8, float64), the second time with every trainable tensor perturbed by 1e-12 of
its largest entry, and prints every 5 steps the difference of the two losses and the global
relative difference of the parameters. A stable recipe keeps them near 1e-12; a chaotic one
amplifies them to order 1, and then no precision makes a trained notebook print the same
numbers on two CPUs (README, "Same numbers on any CPU").

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py                      # the smoke recipe
    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py --isd-condition raw   # the authors' input
"""

from __future__ import annotations

import argparse
import time

import torch

import pfl
from pfl.clip.backbone import load_backbone
from pfl.run.checkpoints import build_method
from pfl.run.features import profile_store


def run(profile, backbone, batches, steps: int, lr: float, eps: float, perturb: bool):
    model = build_method("bayes-pfl", profile, backbone)
    params = [q for q in model.trainable_parameters()]
    if perturb:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for q in params:
                if q.numel():
                    scale = q.abs().max().clamp_min(1e-3)
                    q.add_(1e-12 * scale * torch.randn(q.shape, generator=g, dtype=q.dtype))
    opt = torch.optim.Adam(params, lr=lr, eps=eps)
    model.train(True)
    losses, snaps = [], []
    for s in range(steps):
        loss = model.training_step(batches[s % len(batches)], torch.Generator().manual_seed(s))
        losses.append(float(loss.total.detach()))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        if s % 5 == 4:
            snaps.append([q.detach().clone() for q in params])
    return losses, snaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr (smoke recipe: 1e-3)")
    ap.add_argument("--eps", type=float, default=1e-8, help="Adam eps (torch default 1e-8)")
    ap.add_argument("--flow-type", default="planar", choices=("planar", "gaussian"))
    ap.add_argument("--invertible", action="store_true", help="u-hat planar steps")
    ap.add_argument("--flow-weight", type=float, default=0.01)
    ap.add_argument("--isd-condition", default="unit", choices=("unit", "raw"),
                    help="what the ISD reads (ModelConfig.isd_condition); raw: the authors' code")
    args = ap.parse_args(argv)
    profile = pfl.setup("smoke").replace(
        model={"flow_type": args.flow_type, "invertible": args.invertible,
               "isd_condition": args.isd_condition},
        train={"flow_weight": args.flow_weight}, data={"feature_cache": "memory"})
    backbone = load_backbone(profile.backbone)
    store = profile_store(profile, backbone, profile.data.aux, profile.data.aux_split,
                          per_class=4, progress=False)
    batches = list(store.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    la, a = run(profile, backbone, batches, args.steps, args.lr, args.eps, False)
    lb, b = run(profile, backbone, batches, args.steps, args.lr, args.eps, True)
    rel = [float(torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(A, B)))
                 / torch.sqrt(sum((x ** 2).sum() for x in A))) for A, B in zip(a, b)]
    print(f"flow {args.flow_type}{' (u-hat)' if args.invertible else ''}, lr {args.lr:g}, "
          f"eps {args.eps:g}, flow weight {args.flow_weight:g}, ISD input {args.isd_condition}; "
          f"final loss {la[-1]:.4f}")
    print("step               ", " ".join(f"{5 * (i + 1):>8d}" for i in range(len(rel))))
    print("|loss difference|  ", " ".join(f"{abs(x - y):8.1e}" for x, y in zip(la[4::5], lb[4::5])))
    print("param rel. diff.   ", " ".join(f"{r:8.1e}" for r in rel))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
