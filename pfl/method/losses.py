"""Bayes-PFL's training losses: focal, dice, cross-entropy, flow, orthogonality, and the total.

docs/reproduction.md, "Maps, scores and losses"; appendix Eq. A.2 (L_cls + L_focal + L_dice),
Eq. A.3 (focal), Eq. A.4 (dice); the flow terms come from :class:`pfl.method.flows.PromptFlow`
(Eq. A.1 / Eq. A.5); L_ort is the mean squared off-diagonal cosine similarity inside each prompt
bank.

>>> import torch
>>> p = torch.full((1, 2, 2), 0.5); y = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
>>> round(float(focal_loss(p, y)), 4)   # 0.25 * log 2
0.1733
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from pfl.method.official import official_dice, official_focal, official_orthogonality

FLOW_KEYS = ("isd", "normal", "abnormal")
LOSS_FORMS = ("paper", "official")


def _abnormal(prob: Tensor) -> Tensor:
    # (N, 2, H, W) (normal, abnormal) -> (N, H, W) abnormal; (N, H, W) unchanged.
    return prob[:, 1] if prob.dim() == 4 and prob.shape[1] == 2 else prob


def _prob_correct(prob: Tensor, target: Tensor) -> Tensor:
    """Probability of the true class per pixel, ``(N, H, W)``."""
    if prob.dim() == target.dim() + 1 and prob.shape[1] == 2:
        prob = prob[:, 1]  # (N, 2, H, W): channel 0 normal, 1 abnormal
    if prob.shape != target.shape:
        raise ValueError(
            f"pixel probabilities {tuple(prob.shape)} do not match the masks "
            f"{tuple(target.shape)}: pass (N, H, W) abnormal probabilities or (N, 2, H, W) "
            "(normal, abnormal) probabilities, upsampled to the mask size"
        )
    return torch.where(target > 0.5, prob, 1.0 - prob)


def focal_loss(prob: Tensor, target: Tensor, gamma: float = 2.0, eps: float = 1e-12) -> Tensor:
    """``-(1/N) sum_i (1 - p_i)^gamma log p_i`` over all pixels (appendix Eq. A.3).

    Args:
        prob: ``(N, H, W)`` abnormal probability, or ``(N, 2, H, W)`` (normal, abnormal).
        target: ``(N, H, W)`` mask in {0, 1} (values > 0.5 count as abnormal).
        gamma: focal factor (paper: 2); ``gamma = 0`` is binary cross-entropy.
        eps: ``p_i`` is clamped to at least ``eps`` inside the log.

    Returns:
        scalar: the mean over every pixel of the batch.
    """
    p = _prob_correct(prob, target)
    return -((1.0 - p).pow(gamma) * torch.log(p.clamp_min(eps))).mean()


def _dice(prob: Tensor, target: Tensor, smooth: float) -> Tensor:
    inter = (prob * target).sum((-2, -1))
    total = prob.sum((-2, -1)) + target.sum((-2, -1))
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def dice_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - 2 sum_i y_i p_i / (sum_i y_i + sum_i p_i)`` per image, mean over images (Eq. A.4).

    Args:
        prob: ``(N, H, W)`` abnormal probability, or ``(N, 2, H, W)`` (normal, abnormal).
        target: ``(N, H, W)`` mask.
        smooth: added to numerator and denominator. Eq. A.4 is ``smooth = 0``, which is
            0/0 on a normal image predicted all-normal; 1 keeps every image defined. (The
            authors' form, pooled over the batch: :func:`pfl.method.official.official_dice`.)

    Returns:
        scalar.

    >>> y = torch.zeros(1, 4, 4); y[0, :2] = 1
    >>> float(dice_loss(y, y, smooth=0.0))
    0.0
    """
    prob = _abnormal(prob)
    if prob.shape != target.shape:
        raise ValueError(
            f"dice_loss: probabilities {tuple(prob.shape)} do not match masks {tuple(target.shape)}"
        )
    return _dice(prob, target.to(prob.dtype), smooth)


def ce_loss(global_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the (normal, abnormal) global logits (appendix Eq. A.2, L_cls).

    Args:
        global_logits: ``(N, 2)``, or ``(..., N, 2)`` for several prompt pairs (mean over all).
        labels: ``(N,)`` 0 normal / 1 abnormal.
    """
    if global_logits.shape[-1] != 2 or global_logits.shape[-2] != labels.shape[0]:
        raise ValueError(
            f"ce_loss: logits {tuple(global_logits.shape)} must be (..., N, 2) with "
            f"N = len(labels) = {labels.shape[0]}"
        )
    labels = labels.long().expand(global_logits.shape[:-1])
    return F.cross_entropy(global_logits.reshape(-1, 2), labels.reshape(-1))


def orthogonal_loss(banks: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean squared off-diagonal cosine similarity inside each bank, mean over banks (L_ort).

    Args:
        banks: one bank ``(B, E)``, a stack ``(G, B, E)``, or a list of ``(B, E)`` tensors
            (e.g. the B normal and the B abnormal text features).

    Returns:
        scalar in [0, 1]: 0 for mutually orthogonal prompts, 1 for identical ones. A bank of
        one prompt has no pairs and adds 0.

    >>> float(orthogonal_loss(torch.eye(3)))
    0.0
    """
    if isinstance(banks, Tensor):
        banks = [banks] if banks.dim() == 2 else list(banks)
    terms = []
    for bank in banks:
        if bank.dim() != 2:
            raise ValueError(f"orthogonal_loss: each bank must be (B, E), got {tuple(bank.shape)}")
        n = bank.shape[0]
        if n < 2:
            terms.append(bank.new_zeros(()))
            continue
        f = F.normalize(bank, dim=-1)
        cos = f @ f.T
        off = cos - torch.diag_embed(torch.diagonal(cos))
        terms.append((off * off).sum() / (n * (n - 1)))
    if not terms:
        raise ValueError("orthogonal_loss: no banks given")
    return torch.stack(terms).mean()


def flow_loss(per_sample: Tensor, weight: float = 0.01) -> Tensor:
    """``weight * mean`` of a flow's loss (``FlowSample.loss``, ``(N,)`` or scalar)."""
    return weight * per_sample.mean()


@dataclass
class LossTerms:
    """Every term of one training step, unweighted, and the weighted ``total``.

    ``total = cls + focal + dice + flow_weight * (flow_isd + flow_normal + flow_abnormal)
    + ort_weight * ort``.
    """

    cls: Tensor
    focal: Tensor
    dice: Tensor
    flow_isd: Tensor
    flow_normal: Tensor
    flow_abnormal: Tensor
    ort: Tensor
    total: Tensor

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def bayes_pfl_loss(
    pixel_probs: Tensor | Sequence[Tensor],
    masks: Tensor,
    global_logits: Tensor,
    labels: Tensor,
    flow_losses: Mapping[str, Tensor] | None = None,
    text_banks: Tensor | Sequence[Tensor] | None = None,
    cfg=None,
    flow_weight: float | None = None,
    ort_weight: float | None = None,
    focal_gamma: float | None = None,
    dice_smooth: float = 1.0,
    loss_form: str | None = None,
) -> LossTerms:
    """The auxiliary training loss (appendix Eq. A.1-A.4).

    docs/reproduction.md, "Maps, scores and losses".

    Args:
        pixel_probs: abnormal probabilities per layer at mask size, ``(L, N, H, W)`` or a list
            of L ``(N, H, W)`` (or ``(N, 2, H, W)``) tensors. Focal + dice are summed over the
            L layers, as in the authors' code.
        masks: ``(N, H, W)``.
        global_logits: ``(N, 2)`` (or ``(..., N, 2)``) normal/abnormal logits.
        labels: ``(N,)``.
        flow_losses: ``{"isd", "normal", "abnormal"}`` -> ``FlowSample.loss``; a missing key
            contributes 0 (e.g. an ablation without ISD).
        text_banks: text features per bank for L_ort (see :func:`orthogonal_loss`); ``None``
            gives ``ort = 0``.
        cfg: a :class:`pfl.config.TrainConfig`; its ``flow_weight``, ``ort_weight`` and
            ``focal_gamma`` are used where the explicit arguments are ``None``.
        flow_weight, ort_weight, focal_gamma: defaults 0.01, 1, 2 (docs/reproduction.md).
        dice_smooth: see :func:`dice_loss` (paper form only).
        loss_form: ``"paper"`` (default) or ``"official"``: the authors' focal, dice and L_ort
            (:func:`pfl.method.official.official_focal`, ``official_dice``,
            ``official_orthogonality``); from ``cfg.loss_form`` when None.
    """

    def pick(value, name, default):
        if value is not None:
            return value
        return getattr(cfg, name) if cfg is not None else default

    flow_weight = pick(flow_weight, "flow_weight", 0.01)
    ort_weight = pick(ort_weight, "ort_weight", 1.0)
    focal_gamma = pick(focal_gamma, "focal_gamma", 2.0)

    layers = list(pixel_probs) if pixel_probs is not None else []
    if not layers:
        raise ValueError("bayes_pfl_loss: pixel_probs is empty; pass (L, N, H, W) probabilities")
    loss_form = pick(loss_form, "loss_form", "paper")
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    official = loss_form == "official"
    if official:
        focal = sum(official_focal(_abnormal(p), masks, focal_gamma) for p in layers)
        dice = sum(official_dice(_abnormal(p), masks) for p in layers)
    else:
        focal = sum(focal_loss(p, masks, focal_gamma) for p in layers)
        dice = sum(dice_loss(p, masks, dice_smooth) for p in layers)
    cls = ce_loss(global_logits, labels)

    flow_losses = dict(flow_losses or {})
    unknown = set(flow_losses) - set(FLOW_KEYS)
    if unknown:
        raise ValueError(
            f"bayes_pfl_loss: unknown flow_losses keys {sorted(unknown)}; use {FLOW_KEYS}"
        )
    zero = cls.new_zeros(())
    flows = {k: flow_losses[k].mean() if k in flow_losses else zero for k in FLOW_KEYS}
    if text_banks is None:
        ort = zero
    elif official:
        ort = official_orthogonality(torch.stack(list(text_banks)) if not isinstance(
            text_banks, Tensor) else text_banks)
    else:
        ort = orthogonal_loss(text_banks)

    total = cls + focal + dice + ort_weight * ort
    total = total + sum(flow_loss(v, flow_weight) for v in flows.values())
    return LossTerms(
        cls=cls,
        focal=focal,
        dice=dice,
        flow_isd=flows["isd"],
        flow_normal=flows["normal"],
        flow_abnormal=flows["abnormal"],
        ort=ort,
        total=total,
    )
