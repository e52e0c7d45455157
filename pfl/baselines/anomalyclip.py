"""AnomalyCLIP: object-agnostic learnable prompts, deep text tokens and the DPAM image path.

docs/reproduction.md, "Peers" and appendix A.2: AnomalyCLIP learns two class-agnostic prompts,
``[V_1..V_P] object.`` and ``[W_1..W_P] damaged object.``, whose context vectors are
spliced into the token-embedding sequence (as CoOp does), so the text features are the same
for every class (tested). Its recipe also has

* deep text prompts: learnable tokens that replace the first ``deep_len`` tokens after SOS at
  the input of text blocks 2..``deep_depth`` (AnomalyCLIP: length 4, depth 9). Here they are
  kept, capped at the text tower's depth (the tiny tower has 4 text blocks, so 3 deep sets);
* DPAM, a second ("surgery") path through the image tower from block ``dpam_from`` on: it
  starts as a copy of the residual stream and adds, at each block, a value-value
  self-attention (softmax(V V^T / sqrt(d)) V, then the block's output projection) of that
  block's normal input, with no MLP; patch features are read from this path, the global
  feature from the normal one. AnomalyCLIP applies it to the last 19 of ViT-L's 24 blocks
  (``DPAM_layer = 20``, i.e. blocks 6..24: from the first tapped layer on), the default here.
  DPAM needs pixels (``Batch.images``); ``dpam=False`` reads cached features instead;
* the patch features go to the joint space through CLIP's own ``ln_post`` and projection
  (no adapter), the logit scale is 1 / 0.07, and the loss is cross-entropy on the global
  logits plus focal + dice (abnormal map against the mask and normal map against its
  complement) per layer, summed over layers.

Note:
    With a weak (random-init) tower, CLIP's untrained patch projection leaves little for
    text-only learning to align; that is AnomalyCLIP's recipe, kept as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.baselines.aprilgan import pair_logit_diff, segmentation_loss, upsample_probs
from pfl.baselines.hooks import overwrite_tokens
from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.method.contract import Batch, Prediction, StepLoss
from pfl.method.losses import ce_loss
from pfl.method.prompts import PLACEHOLDER

OBJECT_WORDS = ("object.", "damaged object.")  # AnomalyCLIP's object-agnostic state words


def vv_attention(block: nn.Module, x: Tensor) -> Tensor:
    """Value-value self-attention of an open_clip block on ``x`` ``(N, L, W)`` -> ``(N, L, W)``.

    ``out_proj(softmax(V V^T / sqrt(d)) V)`` per head, with ``V = ln_1(x) W_v + b_v`` the
    block's own value projection (AnomalyCLIP's DPAM; CLIP Surgery's v-v attention).
    """
    attn = block.attn
    width, heads = attn.embed_dim, attn.num_heads
    n, length, _ = x.shape
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    v = v.view(n, length, heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(n, length, width)
    return block.ls_1(attn.out_proj(out))


def encode_image_dpam(backbone: Backbone, images: Tensor, dpam_from: int) -> ImageFeatures:
    """:meth:`Backbone.encode_image` with patch tokens from the DPAM path (see module doc).

    Args:
        backbone: the frozen tower.
        images: ``(N, 3, S, S)`` CLIP-normalised.
        dpam_from: first 1-based block with the v-v path; beyond the last block there is no
            DPAM and the result equals :meth:`Backbone.encode_image` (tested).

    Returns:
        :class:`ImageFeatures`: global ``(N, E)`` from the normal path, patches
        ``(N, L, T, W)`` at the tapped layers (from the DPAM path once it has started).
    """
    visual = backbone.clip.visual
    with torch.no_grad():
        x = visual._embeds(images.to(backbone.dtype))
        surgery, taps = None, {}
        for i, blk in enumerate(visual.transformer.resblocks, start=1):
            if i >= dpam_from:
                surgery = (x if surgery is None else surgery) + vv_attention(blk, x)
            x = blk(x)
            if i in backbone.layers:
                taps[i] = (x if surgery is None else surgery)[:, 1:]
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
    return ImageFeatures(global_=pooled, patches=torch.stack([taps[i] for i in backbone.layers], 1))


def encode_text_deep(backbone: Backbone, x: Tensor, eot: Tensor, deep: Tensor | None) -> Tensor:
    """The truncated text path with deep prompt tokens: ``(N, L, D)`` embeddings -> ``(N, E)``.

    Before text block ``i`` (1-based, ``2 <= i <= 1 + n_deep``) the tokens at positions
    ``1..deep_len`` are replaced by ``deep[i - 2]`` (:func:`pfl.baselines.hooks.overwrite_tokens`
    from the second block on). With ``deep=None`` this is
    :meth:`Backbone.encode_text_embeddings`. Gradients flow into ``x`` and ``deep``.

    Args:
        x: token embeddings with the learnable context already spliced in.
        eot: ``(N,)`` EOT positions.
        deep: ``(n_deep, deep_len, D)`` or None.
    """
    hook = None if deep is None else overwrite_tokens(deep, first_block=1)
    return backbone.encode_text_embeddings(x, eot, hook)


@dataclass
class AnomalyCLIPConfig:
    """AnomalyCLIP's settings (its paper and code; see the module docstring)."""

    n_ctx: int = 12  # learnable context vectors per prompt
    deep_depth: int = 9  # text blocks reached by learnable tokens, counting the input (cap: depth)
    deep_len: int = 4  # learnable tokens per deep block (must be <= n_ctx)
    dpam: bool = True  # patch tokens from the v-v path (needs Batch.images)
    dpam_from: int | None = None  # first 1-based DPAM block; None: the first tapped layer
    logit_scale: float = 1.0 / 0.07  # AnomalyCLIP divides cosine similarities by 0.07
    focal_gamma: float = 2.0
    dice_normal: bool = True  # also dice(normal map, 1 - mask), as AnomalyCLIP
    init_std: float = 0.02  # std of the normal init of every learnable vector


class AnomalyCLIP(nn.Module):
    """AnomalyCLIP on the shared harness (:class:`pfl.method.contract.Method`).

    Args:
        backbone: the frozen tower.
        cfg: :class:`AnomalyCLIPConfig`.
        generator: source of the learnable vectors' init.
    """

    name = "AnomalyCLIP"

    def __init__(self, backbone: Backbone, cfg: AnomalyCLIPConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg = cfg or AnomalyCLIPConfig()
        if not 0 < cfg.deep_len <= cfg.n_ctx:
            raise ValueError(f"deep_len ({cfg.deep_len}) must be in 1..n_ctx ({cfg.n_ctx}): deep "
                             "tokens replace context positions")
        width = backbone.text_width
        texts = [" ".join([PLACEHOLDER] * cfg.n_ctx + [w]) for w in OBJECT_WORDS]
        ids = backbone.tokenize(texts)
        eot = backbone.eot_positions(ids)
        self.register_buffer("ids", ids[:, : int(eot.max()) + 1], persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.ctx = nn.Parameter(torch.empty(2, cfg.n_ctx, width))  # row 0 normal, 1 abnormal
        n_text_blocks = len(backbone.clip.transformer.resblocks)
        n_deep = max(0, min(cfg.deep_depth, n_text_blocks) - 1)
        self.deep = nn.Parameter(torch.empty(n_deep, cfg.deep_len, width))
        for p in (self.ctx, self.deep):
            nn.init.normal_(p, std=cfg.init_std, generator=generator)
        self.dpam_from = cfg.dpam_from or min(backbone.layers)

    @property
    def needs_images(self) -> bool:
        """DPAM reads pixels; the harness then serves ``Batch.images``."""
        return self.cfg.dpam

    # --- the contract ------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from (self.ctx, self.deep)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Learning-rate groups of :func:`pfl.run.train.build_optimizer` (``official``)."""
        return {"prompts": [self.ctx, self.deep]}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {"ctx": self.ctx.detach().clone(), "deep": self.deep.detach().clone()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.ctx.copy_(state["ctx"])
            self.deep.copy_(state["deep"])

    def text_features(self) -> Tensor:
        """``(2, E)`` normalised (normal, abnormal) features; the same for every class."""
        emb = self.backbone.token_embedding(self.ids)
        n = self.cfg.n_ctx
        x = torch.cat([emb[:, :1], self.ctx.to(emb.dtype), emb[:, 1 + n:]], dim=1)
        deep = self.deep if self.deep.numel() else None
        return encode_text_deep(self.backbone, x, self.eot, deep)

    def text_for(self, cls_names: list[str]) -> Tensor:
        """``(N, 2, E)``: every image gets the same object-agnostic pair, whatever its class."""
        return self.text_features().expand(len(cls_names), -1, -1)

    def image_features(self, batch: Batch) -> ImageFeatures:
        if not self.cfg.dpam:
            return batch.features(self.backbone)
        if batch.images is None:
            raise ValueError("AnomalyCLIP with DPAM reads pixels: the Batch needs images (or set "
                             "AnomalyCLIPConfig(dpam=False) to use cached features)")
        return encode_image_dpam(self.backbone, batch.images, self.dpam_from)

    def _outputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-layer abnormal probabilities ``(N, L, S, S)`` and global logits ``(N, 2)``."""
        feats = self.image_features(batch)
        text = self.text_features()
        tokens = F.normalize(self.backbone.project_patches(feats.patches), dim=-1).to(text)
        diff = pair_logit_diff(tokens, text, self.cfg.logit_scale)
        probs = upsample_probs(diff, self.backbone.grid, (self.backbone.image_size,) * 2)
        logits = self.cfg.logit_scale * F.normalize(feats.global_.to(text), dim=-1) @ text.T
        return probs, logits

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        if batch.labels is None:
            raise ValueError("AnomalyCLIP trains a global term: the Batch needs labels")
        probs, logits = self._outputs(batch)
        focal, dice = segmentation_loss(probs, batch.masks, self.cfg.focal_gamma,
                                        self.cfg.dice_normal)
        cls = ce_loss(logits, batch.labels.to(logits.device))
        total = cls + focal + dice
        terms = {"cls": cls, "focal": focal, "dice": dice, "total": total}
        return StepLoss(total, {k: float(v.detach()) for k, v in terms.items()})

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        with torch.no_grad():
            probs, logits = self._outputs(batch)
        return Prediction(maps=probs.mean(1), scores=logits.softmax(-1)[:, 1])
