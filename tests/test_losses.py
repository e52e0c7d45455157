"""Tests of pfl.method.losses against hand-computed values and torch's own losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from pfl import config
from pfl.method.losses import (
    LossTerms,
    bayes_pfl_loss,
    ce_loss,
    dice_loss,
    flow_loss,
    focal_loss,
    orthogonal_loss,
)


def _batch(seed=0, n=3, h=6, w=5):
    g = torch.Generator().manual_seed(seed)
    prob = torch.rand(n, h, w, generator=g, dtype=torch.float64) * 0.98 + 0.01
    mask = (torch.rand(n, h, w, generator=g) > 0.7).double()
    return prob, mask


def test_focal_hand_values():
    prob = torch.tensor([[[0.9, 0.2]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    # p_i = 0.9 and 0.2 (both pixels abnormal)
    expected = -((0.1**2) * math.log(0.9) + (0.8**2) * math.log(0.2)) / 2
    assert abs(float(focal_loss(prob, mask)) - expected) < 1e-12
    mask0 = torch.zeros_like(mask)  # p_i = 0.1 and 0.8
    expected0 = -((0.9**2) * math.log(0.1) + (0.2**2) * math.log(0.8)) / 2
    assert abs(float(focal_loss(prob, mask0)) - expected0) < 1e-12


def test_focal_with_gamma_zero_is_bce_and_two_class_input_agrees():
    prob, mask = _batch()
    assert torch.allclose(focal_loss(prob, mask, gamma=0), F.binary_cross_entropy(prob, mask))
    two = torch.stack([1 - prob, prob], dim=1)
    assert torch.allclose(focal_loss(two, mask), focal_loss(prob, mask))
    # gamma > 0 down-weights every pixel, so focal < BCE
    assert float(focal_loss(prob, mask)) < float(F.binary_cross_entropy(prob, mask))


def test_focal_matches_torch_cross_entropy_on_logits_weighted():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 4, 4, generator=g) > 0.5).long()
    prob = logits.softmax(1)
    ce = F.cross_entropy(logits, mask, reduction="none")  # -log p_i
    p = torch.exp(-ce)
    assert torch.allclose(focal_loss(prob, mask.double()), ((1 - p) ** 2 * ce).mean())


def test_dice_hand_values_and_options():
    prob = torch.tensor([[[0.8, 0.4], [0.0, 0.2]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    # 1 - 2 * 1.2 / (2 + 1.4)
    assert abs(float(dice_loss(prob, mask, smooth=0)) - (1 - 2.4 / 3.4)) < 1e-12
    assert abs(float(dice_loss(prob, mask, smooth=1)) - (1 - 3.4 / 4.4)) < 1e-12


def test_dice_is_per_image_mean_and_perfect_prediction_is_zero():
    prob, mask = _batch()
    per = [float(dice_loss(prob[i : i + 1], mask[i : i + 1])) for i in range(3)]
    assert abs(float(dice_loss(prob, mask)) - sum(per) / 3) < 1e-12
    assert float(dice_loss(mask, mask, smooth=0)) == 0.0
    normal = torch.zeros(1, 3, 3)  # normal image predicted normal: 0/0 without smoothing
    assert float(dice_loss(normal, normal, smooth=1.0)) == 0.0


def test_ce_matches_torch_and_accepts_pair_stacks():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 2, generator=g)
    labels = torch.tensor([0, 1, 1, 0])
    assert torch.allclose(ce_loss(logits, labels), F.cross_entropy(logits, labels))
    stack = torch.randn(3, 4, 2, generator=g)
    ref = sum(F.cross_entropy(stack[i], labels) for i in range(3)) / 3
    assert torch.allclose(ce_loss(stack, labels.float()), ref)
    with pytest.raises(ValueError, match="N, 2"):
        ce_loss(logits, labels[:3])


def test_orthogonal_loss_extremes_and_hand_value():
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    assert float(orthogonal_loss(q[:3] * torch.tensor([[2.0], [0.5], [3.0]]))) < 1e-12
    same = torch.ones(3, 8)
    assert abs(float(orthogonal_loss(same)) - 1.0) < 1e-6
    # two vectors at 60 degrees: cos^2 = 0.25
    bank = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert abs(float(orthogonal_loss(bank)) - 0.25) < 1e-6
    # mean over banks: a list and a (G, B, E) stack agree
    assert abs(float(orthogonal_loss([bank, same[:, :2]])) - 0.625) < 1e-6
    stacked = torch.stack([bank, torch.ones(2, 2)])
    assert abs(float(orthogonal_loss(stacked)) - 0.625) < 1e-6


def test_orthogonal_loss_brute_force():
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(5, 7, generator=g, dtype=torch.float64)
    terms = [
        F.cosine_similarity(bank[i], bank[j], dim=0) ** 2
        for i in range(5)
        for j in range(5)
        if i != j
    ]
    assert torch.allclose(orthogonal_loss(bank), torch.stack(terms).mean())


def test_bayes_pfl_loss_terms_and_total():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(4, 2, 6, 6, generator=g) * 0.98 + 0.01  # (L, N, H, W)
    mask = (torch.rand(2, 6, 6, generator=g) > 0.8).float()
    logits = torch.randn(2, 2, generator=g)
    labels = torch.tensor([0, 1])
    flows = {"isd": torch.tensor([3.0, 5.0]), "normal": torch.tensor(2.0)}
    banks = torch.randn(2, 3, 8, generator=g)
    cfg = config.TrainConfig(flow_weight=0.1, ort_weight=0.5, focal_gamma=1.0)
    t = bayes_pfl_loss(probs, mask, logits, labels, flows, banks, cfg=cfg)
    assert isinstance(t, LossTerms)
    focal = sum(focal_loss(p, mask, 1.0) for p in probs)
    dice = sum(dice_loss(p, mask) for p in probs)
    assert torch.allclose(t.focal, focal) and torch.allclose(t.dice, dice)
    assert torch.allclose(t.cls, F.cross_entropy(logits, labels))
    assert float(t.flow_isd) == 4.0 and float(t.flow_normal) == 2.0
    assert float(t.flow_abnormal) == 0.0
    expected = t.cls + focal + dice + 0.1 * (4.0 + 2.0) + 0.5 * orthogonal_loss(banks)
    assert torch.allclose(t.total, expected)
    d = t.as_dict()
    assert set(d) == {
        "cls",
        "focal",
        "dice",
        "flow_isd",
        "flow_normal",
        "flow_abnormal",
        "ort",
        "total",
    }
    # explicit weights win over cfg; defaults 0.01 / 1 / 2 without either
    t2 = bayes_pfl_loss(list(probs), mask, logits, labels, flows, None, flow_weight=1.0)
    assert torch.allclose(t2.total, t2.cls + t2.focal + t2.dice + 6.0)
    assert float(flow_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(0.02)


def test_bayes_pfl_loss_official_form_and_rejects_bad_keys():
    probs, mask = _batch(6)
    logits, labels = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
    banks = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    paper = bayes_pfl_loss(probs[None], mask, logits, labels, text_banks=banks)
    code = bayes_pfl_loss(probs[None], mask, logits, labels, text_banks=banks,
                          loss_form="official")
    # the authors' forms, written out: fg mean + bg mean; one pooled dice; sum / (N B^2)
    y = mask > 0.5
    pt = torch.where(y, probs, 1 - probs)
    px = -(1 - pt) ** 2 * torch.log(pt + 1e-8)
    assert torch.allclose(code.focal, px[y].mean() + px[~y].mean())
    dice = 1 - (2 * (probs * mask).sum() + 1e-5) / (probs.sum() + mask.sum() + 1e-5)
    assert torch.allclose(code.dice, dice)
    # (B - 1) / B ratio to the paper's L_ort, times the two states summed instead of averaged
    assert torch.allclose(code.ort, paper.ort * 2 * 2 / 3)
    assert torch.allclose(code.cls, paper.cls)
    with pytest.raises(ValueError, match="loss_form"):
        bayes_pfl_loss(probs[None], mask, logits, labels, loss_form="code")
    with pytest.raises(ValueError, match="unknown flow_losses keys"):
        bayes_pfl_loss(probs[None], mask, logits, labels, {"iad": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="do not match the masks"):
        bayes_pfl_loss(probs[None, :, :3], mask, logits, labels)


def test_total_loss_backpropagates_to_pixel_probs():
    probs, mask = _batch(7)
    probs = probs[None].clone().requires_grad_(True)
    t = bayes_pfl_loss(probs, mask, torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
    t.total.backward()
    # raising p on abnormal pixels lowers the loss
    assert bool((probs.grad[0][mask > 0.5] < 0).all())
