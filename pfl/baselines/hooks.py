"""Deep prompt tokens for the peers, through the backbone's one extension point (``tokens_hook``).

:meth:`pfl.clip.backbone.Backbone.encode_image` and
:meth:`~pfl.clip.backbone.Backbone.encode_text_embeddings` call ``hook(j, x)`` before block j
with the batch-first tokens. The two ways the peers use it:

* :func:`append_tokens` (VPT-deep in the image tower, AdaCLIP): prompt tokens follow the image's
  own tokens; before each prompted block the previous prompt tokens are replaced by that
  block's;
* :func:`overwrite_tokens` (deep text prompts, AdaCLIP and AnomalyCLIP): the tokens right after
  SOS (placeholder words reserved by the caller) are overwritten before each prompted block.

Prompt tokens are whole tokens: no positional embedding is added to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pfl.clip.backbone import TokensHook


def _block_tokens(prompts: Tensor, k: int, n: int, dtype) -> Tensor:
    # (J, n_tok, W) shared by the batch, or (J, N, n_tok, W) per image -> (N, n_tok, W)
    p = prompts[k].to(dtype)
    return p.expand(n, -1, -1) if p.dim() == 2 else p


def append_tokens(prompts: Tensor, n_image_tokens: int) -> TokensHook:
    """Hook: before block ``j < J`` the tokens after the first ``n_image_tokens`` become
    ``prompts[j]`` (``(J, n, W)`` or ``(J, N, n, W)``); later blocks keep the last ones."""
    def hook(j: int, x: Tensor) -> Tensor:
        if j >= prompts.shape[0]:
            return x
        p = _block_tokens(prompts, j, x.shape[0], x.dtype)
        return torch.cat([x[:, :n_image_tokens], p], dim=1)

    return hook


def overwrite_tokens(prompts: Tensor, first_block: int = 0) -> TokensHook:
    """Hook: before block ``first_block + k`` (``k < J``) the tokens at positions ``1..n``
    become ``prompts[k]`` (``(J, n, W)`` or ``(J, N, n, W)``); other blocks are untouched."""
    def hook(j: int, x: Tensor) -> Tensor:
        k = j - first_block
        if not 0 <= k < prompts.shape[0]:
            return x
        p = _block_tokens(prompts, k, x.shape[0], x.dtype)
        return torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)

    return hook
