"""Does the flow prior's scale decide whether a prompt bank collapses? One smoke training per
prior std, then zero-shot on the target domain.

Trains the smoke recipe (3 epochs, float64) with ``ModelConfig.prior_std = s`` for each ``s``,
prints the last 5 steps' mean loss terms (``ort`` = L_ort: 1 when the B prompts' text features
coincide), the target's pixel AUROC / AP and image AUROC on ``--per-class`` normal and anomalous
images per category, and the mean per-pixel standard deviation of the maps over the R samples.
A second line per prior gives the trained posterior on 8 aux images spread over the training
set (:func:`pfl.method.diagnostics.posterior_diagnostics`, R = ``mc_test``): q0's mean ``|mu|``
and ``sigma`` of the ISD flow and of the IAD flows, the spread of the flow outputs ``z_K`` over
the R draws, L_ort and the mean cosine distance between the B prompts' text features, and the
maps' spread over R.

    OMP_NUM_THREADS=1 python benchmarks/prior_scale.py --std 1 0.02
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import pfl
from pfl.clip.backbone import load_backbone
from pfl.method.diagnostics import posterior_diagnostics
from pfl.run.checkpoints import build_method
from pfl.run.evaluate import evaluate
from pfl.run.features import profile_store
from pfl.run.train import diagnostics_batch, fit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--std", type=float, nargs="+", default=[1.0, 0.02],
                    help="prior standard deviations to compare (paper: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=20)
    args = ap.parse_args(argv)
    base = pfl.setup("smoke")
    backbone = load_backbone(base.backbone)
    train = profile_store(base, backbone, base.data.aux, base.data.aux_split, progress=False)
    target = profile_store(base, backbone, "target", "test", per_class=args.per_class,
                           progress=False)
    print(f"{len(train)} aux images; target: {len(target)} images")
    probe = diagnostics_batch(train, 8)  # the images fit(diagnostics_every=...) would track
    for s in args.std:
        p = base.replace(model={"prior_std": s}, train={"seed": args.seed})
        model = build_method("bayes-pfl", p, backbone)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            steps = fit(model, train, p.train, tmp, profile=p, resume=False,
                        progress=False).steps_frame()
        last = steps.iloc[-5:][["total", "focal", "dice", "flow_isd", "flow_normal", "ort"]]
        table = evaluate(model, target, p.eval, name="target", progress=False).table
        mean = table.mean(numeric_only=True)
        batch = next(iter(target.batches(8)))
        model.eval()
        with torch.no_grad():
            std = model.predict(batch, torch.Generator().manual_seed(0), map_std=True).map_std
        print(f"prior std {s:g}: last-5-step means "
              + ", ".join(f"{k} {v:.3f}" for k, v in last.mean().items())
              + f" | pixel AUROC {mean['pixel_auroc']:.3f}, pixel AP {mean['pixel_ap']:.3f}, "
              f"image AUROC {mean['image_auroc']:.3f} | map std over R {float(std.mean()):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        d = posterior_diagnostics(model, probe.features(backbone), probe.cls_names,
                                  seed=args.seed)
        print("    posterior: " + ", ".join(
            f"{flow} |mu| {d[flow + '_mu']:.3g} sigma {d[flow + '_sigma']:.3g} "
            f"z std {d[flow + '_z_std']:.3g}" for flow in ("isd", "normal", "abnormal"))
            + f" | ort {d['ort']:.3f}, prompt distance normal {d['dist_normal']:.3g} "
            f"abnormal {d['dist_abnormal']:.3g} | map std over R {d['map_std']:.3f}",
            flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
