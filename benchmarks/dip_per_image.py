"""Is Bayes-PFL's first-epoch dip in pixel AUROC a per-image offset of the maps?

If training first shifted whole maps up or down per image (normal images against anomalous
ones), the pixel AUROC pooled over a category's images would dip while each anomalous image's
own pixel AUROC did not. This trains the smoke recipe for 1 and for 3 epochs (constant
learning rate, so the 1-epoch run is the 3-epoch run's first epoch) and prints, on 8 + 8 target
images per category (means over the 7 categories): the pooled pixel AUROC, the mean per-image
pixel AUROC of the anomalous images, the mean map value of normal images, of anomalous images'
normal pixels and of their defect pixels, the spread of the per-image map means and the mean
within-image spread.

    OMP_NUM_THREADS=1 python benchmarks/dip_per_image.py --prior-std 0.02   # the smoke default
    OMP_NUM_THREADS=1 python benchmarks/dip_per_image.py --prior-std 1      # the paper's prior
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np
from sklearn.metrics import roc_auc_score

import pfl
from pfl.clip.backbone import load_backbone
from pfl.run.checkpoints import build_method
from pfl.run.evaluate import predict_store
from pfl.run.features import profile_store
from pfl.run.train import fit


def map_statistics(pred) -> dict[str, float]:
    """Per-category statistics of smoothed maps, then their mean over categories."""
    cats = np.asarray(pred.cls_names)
    rows = []
    for c in np.unique(cats):
        sel = cats == c
        maps, masks, labels = pred.maps[sel], pred.masks[sel] > 0.5, pred.labels[sel]
        bad = labels == 1
        rows.append({
            "pooled px AUROC": roc_auc_score(masks.ravel(), maps.ravel()),
            "per-image px AUROC": np.mean([roc_auc_score(k.ravel(), x.ravel())
                                           for x, k in zip(maps[bad], masks[bad])]),
            "normal images": maps[~bad].mean(),
            "anomalous, normal px": np.mean([x[~k].mean() for x, k in zip(maps[bad], masks[bad])]),
            "anomalous, defect px": np.mean([x[k].mean() for x, k in zip(maps[bad], masks[bad])]),
            "std of image means": maps.reshape(len(maps), -1).mean(1).std(),
            "within-image std": np.mean([x.std() for x in maps]),
        })
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior-std", type=float, default=None, help="default: the profile's")
    ap.add_argument("--per-class", type=int, default=8)
    args = ap.parse_args(argv)
    base = pfl.setup()
    if args.prior_std is not None:
        base = base.replace(model={"prior_std": args.prior_std})
    backbone = load_backbone(base.backbone)
    train = profile_store(base, backbone, base.data.aux, base.data.aux_split)
    target = profile_store(base, backbone, "target", "test", per_class=args.per_class)
    print(f"prior_std {base.model.prior_std:g}; {len(target)} target images")
    for epochs in (0, 1, 3):
        method = build_method("bayes-pfl", base, backbone)
        if epochs:
            with tempfile.TemporaryDirectory() as tmp:
                fit(method, train, dataclasses.replace(base.train, epochs=epochs), tmp,
                    resume=False, progress=False)
        stats = map_statistics(predict_store(method, target, base.eval))
        print(f"after {epochs} epoch(s): " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
