"""Measure, on the golden fixture (tests/fixtures/official-bayes-pfl), how much each option of
the authors' code changes the numbers: the official preset against the paper's setting for
one option at a time. Prints a Markdown table (docs/authors-code.md quotes it).

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/official_differences.py
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_official as fx  # noqa: E402  (the fixture's recipes and injection helpers)

from pfl.method.model import BayesPFL  # noqa: E402
from pfl.run.checkpoints import load_run  # noqa: E402
from pfl.run.official import import_official  # noqa: E402
from pfl.run.postprocess import scaled_topk, smooth_maps, topk_mean  # noqa: E402


def main() -> None:
    bb = fx.make_backbone()
    profile = fx.make_profile()
    inputs, exp, _ = fx.load_data()
    tmp = Path(tempfile.mkdtemp())
    torch.save({"MyModel": fx.learnable_tensors()}, tmp / "c.pth")
    import_official(tmp / "c.pth", tmp / "run", profile=profile, backbone=bb)
    model, prof = load_run(tmp / "run", backbone=bb)
    feats = bb.encode_image(inputs["images"])
    rows = []

    def infer(m, stage=2):
        m.eval()
        m.image_stage.fill_(stage)
        fx._inject(m, inputs["infer.noise"].permute(1, 2, 0, 3))
        with torch.no_grad():
            return m.forward_features(feats, fx.CLASSES)

    def train_terms(m, cfg):
        m.train()
        m.image_stage.fill_(1)
        noise = torch.zeros(3, 1, 2, 768)
        noise[0, 0] = inputs["train.noise_isd"]
        noise[1, 0, 0], noise[2, 0, 0] = inputs["train.noise_iad"]
        fx._inject(m, noise)
        with torch.no_grad():
            out = m.forward_features(feats, fx.CLASSES, bank_index=1)
            t = m.loss(out, inputs["masks"], inputs["labels"], cfg)
        m.eval()
        return t

    s1, s2 = infer(model, 1), infer(model, 2)
    match = [("anomaly map", s2.anomaly_map, exp["infer.anomaly_map"]),
             ("smoothed map (sigma 8)", torch.from_numpy(smooth_maps(s2.anomaly_map, 8.0)),
              exp["infer.anomaly_map_smoothed"]),
             ("stage-1 score", s1.score, exp["infer.stage1.score"]),
             ("stage-2 score", s2.score, exp["infer.stage2.score"])]
    print("| pfl with the official preset vs the authors' code | max abs difference |")
    print("|---|---|")
    for name, got, want in match:
        print(f"| {name} | {float((got.double() - want.double()).abs().max()):.2g} |")
    _, _, scalars = fx.load_data()
    want = {k: v["value"] for k, v in scalars["train"]["terms"].items() if "value" in v}
    t = train_terms(model, prof.train)
    for name, key in (("CE", "cls_ce"), ("focal (4 layers)", "focal_sum_4_layers"),
                      ("dice (4 layers)", "dice_sum_4_layers"), ("L_ort", "orthogonality"),
                      ("ISD flow term x0.01", "flow_isd_weighted"),
                      ("IAD normal flow term x0.01", "flow_iad_normal_weighted"),
                      ("IAD abnormal flow term x0.01", "flow_iad_abnormal_weighted"),
                      ("total", "total")):
        attr = {"cls_ce": "cls", "focal_sum_4_layers": "focal", "dice_sum_4_layers": "dice",
                "orthogonality": "ort", "flow_isd_weighted": "flow_isd",
                "flow_iad_normal_weighted": "flow_normal",
                "flow_iad_abnormal_weighted": "flow_abnormal", "total": "total"}[key]
        value = float(getattr(t, attr)) * (0.01 if "flow" in key else 1.0)
        print(f"| {name} | {abs(value - want[key]):.2g} |")
    print()
    rows.append(("second stage (image score)", "stage-1 vs stage-2 score",
                 float((s1.score - s2.score).abs().max())))
    raw = s2.anomaly_map.numpy()
    smooth = smooth_maps(raw, 8.0)
    rows.append(("test-set score: top-k of raw vs smoothed map (k=2000)", "top-k mean",
                 float(np.abs(topk_mean(raw, 2000) - topk_mean(smooth, 2000)).max())))
    rows.append(("test-set score: k=2000 vs pfl's area-scaled k at 336 px",
                 f"top-k mean (k={scaled_topk(2000, 336)})",
                 float(np.abs(topk_mean(raw, 2000) - topk_mean(raw, scaled_topk(2000, 336)))
                       .max())))
    off = train_terms(model, prof.train)
    pap = train_terms(model, dataclasses.replace(prof.train, loss_form="paper"))
    for name in ("focal", "dice", "ort"):
        rows.append((f"loss form: {name}", "term, official vs paper",
                     float(abs(getattr(off, name) - getattr(pap, name)))))
    # IAD log-det / N: the same model without the option
    plain = BayesPFL(bb, dataclasses.replace(prof.model, iad_logdet_per_batch=False),
                     train_cfg=prof.train)
    plain.load_trainable_state_dict(model.trainable_state_dict())
    p = train_terms(plain, prof.train)
    for name in ("flow_normal", "flow_abnormal"):
        rows.append((f"IAD log-det / N: {name}", "x0.01 term",
                     0.01 * float(abs(getattr(off, name) - getattr(p, name)))))
    # bilinear align_corners (part of official_compat)
    plain = BayesPFL(bb, dataclasses.replace(prof.model, official_compat=False,
                                             mlp_hidden=bb.vision_width // 2))
    state = model.trainable_state_dict()
    plain.load_trainable_state_dict(state)
    plain.image_stage.fill_(2)
    diff = (infer(plain).anomaly_map - s2.anomaly_map).abs().max()
    rows.append(("official_compat off (align_corners=False, std softplus(s))", "raw map",
                 float(diff)))
    # ISD input: the released weights read the raw global feature; unit norm instead
    plain = BayesPFL(bb, dataclasses.replace(prof.model, isd_condition="unit"))
    plain.load_trainable_state_dict(state)
    diff = (infer(plain).anomaly_map - s2.anomaly_map).abs().max()
    rows.append(("isd_condition='unit' (pfl) on the authors' weights", "raw map", float(diff)))
    print("| option | quantity | max abs difference on the fixture |")
    print("|---|---|---|")
    for a, b, v in rows:
        print(f"| {a} | {b} | {v:.2g} |")


if __name__ == "__main__":
    main()
