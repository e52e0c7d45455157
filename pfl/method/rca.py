"""Patch features for Bayes-PFL and the text refinement against them (RCA).

docs/reproduction.md, "Backbone" (per-layer projections of the patch tokens) and "RCA" (residual
cross-attention of the text features to the patches of each layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerProjections(nn.Module):
    """Per-layer bias-free ``Linear(W_v -> E)``, then L2 normalisation.

    docs/reproduction.md, "Backbone".

    One ``(L, E, W_v)`` weight so that all layers are one ``einsum``.
    """

    def __init__(self, n_layers: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_layers, out_dim, in_dim))

    def forward(self, patches: Tensor) -> Tensor:
        """``(N, L, T, W_v) -> F_s (N, L, T, E)``, unit norm."""
        return F.normalize(torch.einsum("nltw,lew->nlte", patches, self.weight), dim=-1)


class RCA(nn.Module):
    """Text refinement with the patches of each layer (docs/reproduction.md, "RCA").

    ``Q = Linear(E -> E, bias)(F_t)`` (shared by layers), ``K = V = F_s``, ``heads`` heads,
    scale ``E^-0.5`` of the joint width (not the head width), softmax over patches, no output
    projection; ``F_t' = normalize(attention + F_t)``.
    """

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"RCA: joint width {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, dim ** -0.5
        self.query = nn.Linear(dim, dim)

    def forward(self, text: Tensor, patches: Tensor) -> Tensor:
        """``text (N, M, E)``, ``patches F_s (N, L, T, E)`` -> ``F_t' (N, L, M, E)``."""
        n, m, e = text.shape
        n_layers, t = patches.shape[1:3]
        h, dh = self.heads, e // self.heads
        q = self.query(text).view(n, 1, m, h, dh).transpose(2, 3)
        q = q.expand(n, n_layers, h, m, dh).reshape(n * n_layers, h, m, dh)
        kv = patches.reshape(n * n_layers, t, h, dh).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale)  # (N L, h, M, dh)
        att = att.transpose(1, 2).reshape(n, n_layers, m, e)
        return F.normalize(att + text[:, None], dim=-1)
