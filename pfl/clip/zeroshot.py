"""Training-free zero-shot maps: patch tokens against hand-written normal/abnormal prompts.

The starting point of WinCLIP and APRIL-GAN (docs/reproduction.md, "Peers"): each patch token is
mapped into CLIP's joint space through ``ln_post`` and the projection
(:meth:`pfl.clip.backbone.Backbone.project_patches`), compared by cosine similarity with the mean
text feature of a few "normal" and "abnormal" prompts, and a two-way softmax gives the
abnormal probability. No parameter is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfl.clip.backbone import Backbone

NORMAL_STATES = ("flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{}")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.")


def state_prompts(obj: str, states: tuple[str, ...], templates=TEMPLATES) -> list[str]:
    """Every template filled with every state of ``obj``.

    >>> state_prompts("bottle", ("damaged {}",), ("a photo of a {}.",))
    ['a photo of a damaged bottle.']
    """
    return [t.format(s.format(obj)) for s in states for t in templates]


def text_pair(backbone: Backbone, obj: str) -> torch.Tensor:
    """(2, E) normalised mean text features: row 0 normal, row 1 abnormal."""
    with torch.no_grad():
        rows = [
            backbone.encode_text(state_prompts(obj, states)).mean(0)
            for states in (NORMAL_STATES, ABNORMAL_STATES)
        ]
    return F.normalize(torch.stack(rows), dim=-1)


def zero_shot_maps(
    backbone: Backbone, images: torch.Tensor, obj: str = "object", temperature: float = 0.07
) -> torch.Tensor:
    """Abnormal probability per tapped layer, upsampled: images (N,3,S,S) -> (N, L, S, S).

    softmax over the (normal, abnormal) pair equals sigmoid of the logit difference, so only
    the difference is upsampled (bilinear upsampling is linear, so this is exact).
    """
    text = text_pair(backbone, obj)  # (2, E)
    feats = backbone.encode_image(images)
    with torch.no_grad():
        tokens = F.normalize(backbone.project_patches(feats.patches), dim=-1)  # (N, L, T, E)
        diff = tokens @ (text[1] - text[0]) / temperature  # (N, L, T)
    n, n_layers, _ = diff.shape
    gh, gw = backbone.grid
    up = F.interpolate(diff.reshape(n, n_layers, gh, gw), size=images.shape[-2:],
                       mode="bilinear", align_corners=False)
    return torch.sigmoid(up)
