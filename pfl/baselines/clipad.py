"""CLIP-AD (SDP+): APRIL-GAN's adapters plus a training-free staged dual path with feature surgery.

docs/reproduction.md, "Peers" and appendix A.2; the method is Chen et al., "CLIP-AD: A
Language-Guided Staged Dual-Path Model for Zero-shot Anomaly Detection" (arXiv 2311.00453). The
row compared in the paper is SDP+, its fine-tuned model. Two paths run through the one frozen
image tower:

* the **original path** (the plain residual stream at the tapped layers) goes through
  APRIL-GAN's per-layer linear adapters, ``F_l = normalize(W_l P_l + b_l)``; per layer the
  two-way softmax of scaled cosine similarities with the (normal, abnormal) text gives an
  abnormal probability. Only these adapters train, with APRIL-GAN's focal + dice loss on the
  auxiliary domain: CLIP-AD's training *is* APRIL-GAN's (:class:`CLIPAD` subclasses
  :class:`pfl.baselines.aprilgan.AprilGAN` and inherits ``training_step``);
* the **surgery path** (training-free), CLIP Surgery's "architecture surgery": beside every
  block, the block's own value-value self-attention (``softmax(V V^T / sqrt(d)) V`` through the
  block's output projection, no MLP; :func:`pfl.baselines.anomalyclip.vv_attention`) of the
  original path's input is accumulated into a second stream. It is *staged*: the stream
  restarts after each tapped layer, so the features read at tap ``l`` are the sum of the v-v
  outputs of the blocks since the previous tap (:func:`encode_dual_path`). They go to the joint
  space through CLIP's ``ln_post`` and projection, and the **feature surgery**
  (:func:`feature_surgery`) removes the component that the normal and abnormal text features
  share: with class weights ``w_k`` (from the original path's CLS token at that layer,
  :func:`surgery_weights`),

      s_k(x) = <x, w_k t_k - mean_j w_j t_j>,

  so the redundant ``mean_j w_j t_j`` (whatever both prompts have in common, e.g. the object
  itself) no longer lights up: CLIP-AD's answer to "opposite predictions and irrelevant
  highlights". The abnormal channel ``s_a`` is summed over layers.

The published map is ``M = sum_l s_a,l + sum_l p_l`` (p_l the adapters' abnormal
probability). Here ``maps = (M / L + 1) / 3``: since ``|s_a,l| <= 1`` for unit vectors and
weights that average to 1, this lies in [0, 1] as ``Prediction`` asks, and it
is an increasing affine function of ``M`` (so every pixel metric, and the Gaussian blur, are
unchanged). The published image score is transductive (per class over the test set:
``minmax(global) + minmax(max map)``); ``image_score="global_max"`` (default) is its per-image
form ``0.5 * (global + max map)``, ``"global"`` the zero-shot global score alone (the
transductive form is :mod:`pfl.run.evaluate`'s ``official_minmax``, which uses a top-k mean).

Reproduced: the adapters and their training; the dual path with v-v attention on every block;
the staging (restart after each tap; with the default four evenly spaced taps this is the
published restart every quarter of the blocks); the feature surgery with CLS-derived class
weights at temperature 1; the sum of both maps; the global score from the CLS feature.

Approximated:
  * Representative Vector Selection (RVS: DBSCAN / KDE / PCA over the prompt features) is not
    reproduced; the text is APRIL-GAN's cached prompt ensemble with RVS's ``mean`` option
    (:class:`pfl.baselines.winclip.PromptEnsemble`; CLIP-AD's own state list adds "scratch",
    "crack", "contamination" and "imperfect"/"blemished" words).
  * The logit scale of the adapters and the global score is APRIL-GAN's here (5, see
    :class:`~pfl.baselines.aprilgan.AprilGANConfig`), not CLIP-AD's 100: weak towers collapse
    at 100 (docs/reproduction.md, "Measured on this kind of machine").
  * Bilinear upsampling uses ``align_corners=False`` for both maps (the authors mix both).
  * ``dual_path=False`` runs from cached features, for speed or when images are absent: the
    surgery is then applied to the original path's tokens (feature surgery without architecture
    surgery) with weights from the global feature at every layer.

Note:
    The surgery path needs pixels, but only at inference: training touches the adapters alone.
    ``needs_images`` is therefore True only in eval mode (``method.train(False)``), which is
    how :mod:`pfl.run.train` and :mod:`pfl.run.evaluate` ask for images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pfl.baselines.anomalyclip import vv_attention
from pfl.baselines.aprilgan import AprilGAN, AprilGANConfig, pair_logit_diff, upsample_probs
from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.method.contract import Batch, Prediction

IMAGE_SCORES = ("global_max", "global")


def feature_surgery(tokens: Tensor, text: Tensor, weights: Tensor | None = None) -> Tensor:
    """CLIP Surgery's feature surgery: similarities with the class-shared component removed.

    ``s_k(x) = sum_c (w_k x_c t_kc - mean_j w_j x_c t_jc) = <x, w_k t_k - mean_j w_j t_j>``:
    the element-wise products of a token with every class's text feature, minus their mean
    over classes (the "redundant feature"), summed over channels. The result sums to zero over
    the classes, and with equal weights it does not depend on any component that all text
    features share (tested on a hand-built case).

    Args:
        tokens: ``(..., T, E)`` (normalised) patch features.
        text: ``(..., K, E)`` class text features (here K = 2: normal, abnormal).
        weights: ``(..., K)`` class weights (:func:`surgery_weights`), or None for all ones.
            Leading dimensions of the three broadcast.

    Returns:
        ``(..., T, K)``.

    >>> x = torch.tensor([[1.0, 0.0, 0.0]])
    >>> t = torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0]])  # share 5 * e0
    >>> (x @ t.T).tolist(), feature_surgery(x, t).tolist()
    ([[5.0, 5.0]], [[0.0, 0.0]])
    """
    wt = text if weights is None else weights[..., None] * text
    centred = wt - wt.mean(dim=-2, keepdim=True)
    return tokens @ centred.transpose(-1, -2)


def surgery_weights(cls: Tensor, text: Tensor, temperature: float = 1.0) -> Tensor:
    """Class weights of the surgery: ``w = p / mean(p)``, ``p = softmax(<g, t_k> / temperature)``.

    They restrain a class that is obvious for the whole image (CLIP Surgery's weighting; CLIP-AD
    computes ``p`` from the CLS token of each tapped layer at temperature 1).

    Args:
        cls: ``(..., E)`` normalised CLS (global) features.
        text: ``(..., K, E)`` normalised text features; leading dimensions broadcast.

    Returns:
        ``(..., K)``, averaging to 1 over the K classes.
    """
    p = (torch.einsum("...e,...ke->...k", cls, text) / temperature).softmax(dim=-1)
    return p / p.mean(dim=-1, keepdim=True)


@dataclass
class DualPathFeatures:
    """Both paths of :func:`encode_dual_path` at the tapped layers.

    original: :class:`ImageFeatures` of the plain tower (equal to ``Backbone.encode_image``).
    surgery: ``(N, L, T, W)`` surgery-path patch tokens (raw, pre-``ln_post``).
    cls: ``(N, L, W)`` the original path's CLS token at each tap (raw).
    """

    original: ImageFeatures
    surgery: Tensor
    cls: Tensor


def encode_dual_path(backbone: Backbone, images: Tensor, staged: bool = True) -> DualPathFeatures:
    """One pass of the frozen tower computing CLIP-AD's original and surgery paths.

    Before block ``i`` with input ``x_{i-1}`` (the original path), the surgery stream gains
    ``vv_attention(block_i, x_{i-1})``. With ``staged`` it restarts (from zero) after every
    tapped layer, so the tokens read at tap ``l`` are ``sum_{i in stage(l)} vv(block_i,
    x_{i-1})``; without it the stream accumulates from the first block on.

    Args:
        backbone: the frozen tower (open_clip ViT, batch-first blocks).
        images: ``(N, 3, S, S)`` CLIP-normalised.

    Returns:
        :class:`DualPathFeatures`.
    """
    visual = backbone.clip.visual
    with torch.no_grad():
        x = visual._embeds(images.to(backbone.dtype))
        stream = None
        ori, surg, cls = [], [], []
        for i, block in enumerate(visual.transformer.resblocks, start=1):
            v = vv_attention(block, x)
            stream = v if stream is None else stream + v
            x = block(x)
            if i in backbone.layers:
                ori.append(x[:, 1:])
                surg.append(stream[:, 1:])
                cls.append(x[:, 0])
                if staged:
                    stream = None
        pooled, _ = visual._pool(x)
        original = ImageFeatures(global_=pooled @ visual.proj, patches=torch.stack(ori, dim=1))
    return DualPathFeatures(original, torch.stack(surg, dim=1), torch.stack(cls, dim=1))


@dataclass
class CLIPADConfig(AprilGANConfig):
    """CLIP-AD's settings: APRIL-GAN's (adapters, prompts, scale, loss) plus the surgery path."""

    dual_path: bool = True  # surgery path through v-v attention (needs images at inference)
    staged: bool = True  # restart the surgery stream after each tapped layer (CLIP-AD's stages)
    surgery_weights: bool = True  # CLS-derived class weights (False: plain mean removal)
    surgery_temperature: float = 1.0  # softmax temperature of those weights (CLIP-AD: 1)
    image_score: str = "global_max"  # "global_max": 0.5 (global + max map) | "global"


class CLIPAD(AprilGAN):
    """CLIP-AD (SDP+) on the shared harness (:class:`pfl.method.contract.Method`).

    Trains exactly as APRIL-GAN (inherited ``training_step``, cached features); predicts with
    both paths (module docstring).

    Args:
        backbone: the frozen tower.
        cfg: :class:`CLIPADConfig`.
        generator: source of the adapters' init.
    """

    name = "CLIP-AD"

    def __init__(self, backbone: Backbone, cfg: CLIPADConfig | None = None,
                 generator: torch.Generator | None = None):
        cfg = cfg or CLIPADConfig()
        if cfg.image_score not in IMAGE_SCORES:
            raise ValueError(f"CLIPADConfig.image_score must be one of {IMAGE_SCORES}, got "
                             f"{cfg.image_score!r}")
        super().__init__(backbone, cfg, generator)

    @property
    def needs_images(self) -> bool:
        # Only inference runs the surgery path; training reads cached features.
        return self.cfg.dual_path and not self.training

    def surgery_probs(self, tokens: Tensor, cls: Tensor, text: Tensor) -> Tensor:
        """The surgery path's abnormal channel per layer, ``(N, L, T)``, in [-1, 1].

        Args:
            tokens: ``(N, L, T, E)`` normalised joint-space patch tokens.
            cls: ``(N, L, E)`` normalised CLS features for the weights.
            text: ``(N, 2, E)`` (normal, abnormal).
        """
        text_l = text[:, None]  # (N, 1, 2, E): the same text at every layer
        weights = (surgery_weights(cls, text_l, self.cfg.surgery_temperature)
                   if self.cfg.surgery_weights else None)
        return feature_surgery(tokens, text_l, weights)[..., 1]

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        mode = self.cfg.infer_prompts
        with torch.no_grad():
            if self.cfg.dual_path:
                if batch.images is None:
                    raise ValueError("CLIP-AD's surgery path reads pixels: the Batch needs images "
                                     "(or set CLIPADConfig(dual_path=False) for cached features)")
                dual = encode_dual_path(self.backbone, batch.images, self.cfg.staged)
                feats, surgery_raw, cls_raw = dual.original, dual.surgery, dual.cls
            else:
                feats = batch.features(self.backbone)
                surgery_raw, cls_raw = feats.patches, None
            text = self.text[mode](batch.cls_names).to(feats.global_)
            scale = self.log_scale.exp()
            size = (self.backbone.image_size,) * 2
            # Original path: APRIL-GAN's adapters, (N, L, S, S) abnormal probabilities.
            adapted = upsample_probs(pair_logit_diff(self.adapters(feats.patches), text, scale),
                                     self.backbone.grid, size)
            # Surgery path: CLIP's own projection, feature surgery, (N, L, S, S) in [-1, 1].
            tokens = F.normalize(self.backbone.project_patches(surgery_raw), dim=-1).to(text)
            g = F.normalize(feats.global_.to(text), dim=-1)
            cls = (g[:, None].expand(-1, tokens.shape[1], -1) if cls_raw is None
                   else F.normalize(self.backbone.project_patches(cls_raw), dim=-1).to(text))
            surgery = self.surgery_probs(tokens, cls, text)
            n, n_layers, _ = surgery.shape
            surgery = F.interpolate(surgery.reshape(n, n_layers, *self.backbone.grid), size=size,
                                    mode="bilinear", align_corners=False)
            maps = (adapted.mean(1) + surgery.mean(1) + 1.0) / 3.0
            score = torch.sigmoid(scale * (g * (text[:, 1] - text[:, 0])).sum(-1))
            if self.cfg.image_score == "global_max":
                score = 0.5 * (score + maps.amax(dim=(-2, -1)))
        return Prediction(maps=maps, scores=score)
