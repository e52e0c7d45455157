"""APRIL-GAN: per-layer linear adapters aligning patch tokens with a cached prompt ensemble.

docs/reproduction.md, "Peers" and appendix A.2: APRIL-GAN keeps WinCLIP's hand-written prompt
ensemble (:class:`pfl.baselines.winclip.PromptEnsemble`, encoded once per class and cached) and
learns, for each tapped layer l, a linear map of the raw patch tokens into the joint space,
F_l = normalize(W_l P_l + b_l). Per layer, a two-way softmax of scaled cosine similarities with
the (normal, abnormal) text features gives an abnormal probability; the map is the MEAN over
layers (APRIL-GAN sums; the mean ranks pixels identically and keeps the map a probability, as
``Prediction`` asks). Training on the auxiliary domain uses focal + dice per
layer, summed over layers (appendix Eq. A.3, A.4). The image score is CLIP's zero-shot global
score (CLS feature against the same text), which APRIL-GAN does not train.

Appendix A.1 / Table A.1: the prompts can be the single pair (SP) or the ensemble (PE),
separately for training (``train_prompts``) and inference (``infer_prompts``).

The shared pieces (:class:`LayerAdapters`, :func:`pair_logit_diff`, :func:`upsample_probs`,
:func:`segmentation_loss`) are reused by the other peers (CLIP-AD builds on APRIL-GAN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.baselines.winclip import PromptEnsemble
from pfl.clip.backbone import Backbone
from pfl.method.contract import Batch, Prediction, StepLoss
from pfl.method.losses import dice_loss, focal_loss


class LayerAdapters(nn.Module):
    """One linear map per tapped layer, vectorised: ``(N, L, T, W) -> (N, L, T, E)``, normalised.

    Args:
        n_layers: L.
        in_dim: W, the vision width (raw residual stream).
        out_dim: E, the joint embedding width.
        bias: APRIL-GAN's layers have a bias (torch's ``nn.Linear`` default); Bayes-PFL's not.
        generator: source of the init draws (``nn.Linear``'s default init: uniform with bound
            ``1 / sqrt(in_dim)``, i.e. kaiming-uniform with ``a = sqrt(5)``).
    """

    def __init__(self, n_layers: int, in_dim: int, out_dim: int, bias: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_layers, out_dim, in_dim))
        nn.init.uniform_(self.weight, -bound, bound, generator=generator)
        if bias:
            self.bias = nn.Parameter(torch.empty(n_layers, out_dim))
            nn.init.uniform_(self.bias, -bound, bound, generator=generator)
        else:
            self.register_parameter("bias", None)

    def forward(self, patches: Tensor) -> Tensor:
        out = torch.einsum("nltw,lew->nlte", patches.to(self.weight.dtype), self.weight)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return F.normalize(out, dim=-1)


def pair_logit_diff(tokens: Tensor, text: Tensor, scale: Tensor | float) -> Tensor:
    """Abnormal-minus-normal logit per token: ``scale * <f, t_a - t_n>``.

    The two-way softmax over (normal, abnormal) is the sigmoid of this difference, and
    bilinear upsampling is linear, so upsampling the difference is exact (docs/reproduction.md,
    "Maps, scores and losses").

    Args:
        tokens: ``(N, L, T, E)`` normalised patch features.
        text: ``(N, 2, E)`` per-image (normal, abnormal) features, or ``(2, E)`` shared.
        scale: the logit scale (a float or a 0-dim tensor, e.g. a learnable temperature).

    Returns:
        ``(N, L, T)``.
    """
    diff = text[..., 1, :] - text[..., 0, :]
    if diff.dim() == 1:
        return scale * (tokens @ diff)
    return scale * torch.einsum("nlte,ne->nlt", tokens, diff)


def upsample_probs(diff: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Logit differences on the grid ``(N, L, T)`` -> abnormal probabilities ``(N, L, H, W)``."""
    n, n_layers, _ = diff.shape
    up = F.interpolate(diff.reshape(n, n_layers, *grid), size=size, mode="bilinear",
                       align_corners=False)
    return torch.sigmoid(up)


def segmentation_loss(probs: Tensor, masks: Tensor, gamma: float = 2.0,
                      include_normal: bool = False) -> tuple[Tensor, Tensor]:
    """Focal and dice losses, each summed over layers: probs ``(N, L, H, W)``, masks ``(N, H, W)``.

    ``include_normal`` adds the dice of the normal map against ``1 - mask`` (AnomalyCLIP does).
    """
    if masks is None:
        raise ValueError("this method trains on pixel masks: the Batch has masks=None")
    masks = masks.to(probs)
    if masks.shape[-2:] != probs.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match the maps "
                         f"{tuple(probs.shape)}: give masks at the image size")
    # One unbind, not a probs[:, i] per use: each indexing's backward fills a zero gradient
    # of the whole (N, L, H, W) tensor (a third of a training step); unbind's stacks the layers.
    layers = probs.unbind(1)
    focal = sum(focal_loss(p, masks, gamma) for p in layers)
    dice = sum(dice_loss(p, masks) for p in layers)
    if include_normal:
        dice = dice + sum(dice_loss(1.0 - p, 1.0 - masks) for p in layers)
    return focal, dice


@dataclass
class AprilGANConfig:
    """APRIL-GAN's settings (docs/reproduction.md, "Peers"; appendix A.1, Table A.1)."""

    train_prompts: str = "pe"  # "sp" | "pe": the text the adapters are trained against
    infer_prompts: str = "pe"  # "sp" | "pe": the text at inference
    # APRIL-GAN uses 100. With weak (tiny, random-init) towers 100 saturates the softmax and
    # training collapses to "all normal" (docs/reproduction.md, "Measured on this kind of
    # machine"); 5 learns. 100.0 restores it.
    logit_scale: float = 5.0
    learn_scale: bool = False  # True: a learnable log-temperature initialised at logit_scale
    adapter_bias: bool = True  # APRIL-GAN's linear layers have a bias
    focal_gamma: float = 2.0


class AprilGAN(nn.Module):
    """APRIL-GAN on the shared harness (:class:`pfl.method.contract.Method`); reads cached features.

    Args:
        backbone: the frozen tower.
        cfg: :class:`AprilGANConfig`.
        generator: source of the adapters' init.
    """

    name = "APRIL-GAN"
    needs_images = False  # reads cached features

    def __init__(self, backbone: Backbone, cfg: AprilGANConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg or AprilGANConfig()
        self.adapters = LayerAdapters(len(backbone.layers), backbone.vision_width,
                                      backbone.embed_dim, self.cfg.adapter_bias, generator)
        log_scale = torch.tensor(math.log(self.cfg.logit_scale))
        if self.cfg.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.text = {m: PromptEnsemble(backbone, m)
                     for m in {self.cfg.train_prompts, self.cfg.infer_prompts}}

    # --- the contract ------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.adapters.parameters()
        if self.cfg.learn_scale:
            yield self.log_scale

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Learning-rate groups of :func:`pfl.run.train.build_optimizer` (``official``)."""
        groups = {"rest": list(self.adapters.parameters())}
        if self.cfg.learn_scale:
            groups["temperatures"] = [self.log_scale]
        return groups

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state, strict=False)

    def pixel_probs(self, batch: Batch, mode: str) -> Tensor:
        """Per-layer abnormal probabilities at the image size, ``(N, L, S, S)``."""
        feats = batch.features(self.backbone)
        tokens = self.adapters(feats.patches)
        text = self.text[mode](batch.cls_names).to(tokens)
        diff = pair_logit_diff(tokens, text, self.log_scale.exp())
        size = (self.backbone.image_size,) * 2
        return upsample_probs(diff, self.backbone.grid, size)

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        probs = self.pixel_probs(batch, self.cfg.train_prompts)
        focal, dice = segmentation_loss(probs, batch.masks, self.cfg.focal_gamma)
        total = focal + dice
        return StepLoss(total, {"focal": float(focal.detach()), "dice": float(dice.detach()),
                                "total": float(total.detach())})

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        with torch.no_grad():
            probs = self.pixel_probs(batch, self.cfg.infer_prompts)
            feats = batch.features(self.backbone)
            text = self.text[self.cfg.infer_prompts](batch.cls_names).to(probs)
            g = F.normalize(feats.global_.to(probs), dim=-1)
            score = torch.sigmoid(self.log_scale.exp()
                                  * (g * (text[:, 1] - text[:, 0])).sum(-1))
        return Prediction(maps=probs.mean(1), scores=score)
