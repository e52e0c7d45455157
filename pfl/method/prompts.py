"""Prompts of Bayes-PFL: class-name words, the token template, splicing, the learnable banks.

docs/reproduction.md, "Prompts": the class-aware template is
``[SOS] [P context vectors] [Q state vectors] <class words> [EOT]``, padded to 77 tokens.
The token ids are built once per class with ``P + Q`` placeholder tokens ("X"); the learnable
vectors (plus one flow sample each, see :mod:`pfl.method.model`) replace the placeholders' rows of
the token-embedding sequence. The EOT position is that of the token-id skeleton, so the
text tower reads the right output token.

>>> class_words("pcb3"), class_words("metal_nut"), class_words("Screw_Bag")
('printed circuit board', 'metal nut', 'screw bag')
>>> template_text(2, 1, "metal nut")
'X X X metal nut'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# docs/reproduction.md, "Prompts": the paper's mapping of dataset class names to words.
CLASS_WORDS = {
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum",
    "metal_nut": "metal nut",
}
PLACEHOLDER = "X"  # one BPE token in CLIP's vocabulary; its rows are overwritten


def class_words(name: str) -> str:
    """The words a dataset class name stands for in the prompt (lower case).

    The paper's mapping (:data:`CLASS_WORDS`) first; otherwise underscores become spaces.
    """
    key = name.strip().lower()
    if key in CLASS_WORDS:
        return CLASS_WORDS[key]
    words = re.sub(r"[_\s]+", " ", key).strip()
    if not words:
        raise ValueError(f"class name {name!r} has no words; give a non-empty class name")
    return words


def template_text(n_ctx: int, n_state: int, words: str = "") -> str:
    """The text whose tokens form the skeleton: ``P + Q`` placeholders, then the class words."""
    return " ".join([PLACEHOLDER] * (n_ctx + n_state) + ([words] if words else []))


@dataclass
class PromptSkeleton:
    """Token ids of the template for a list of class names.

    Attributes:
        ids: ``(C, L)`` token ids, cut right after the longest EOT (the text path cuts there
            anyway: docs/reproduction.md, "Prompts": the causal mask makes it exact).
        eot: ``(C,)`` index of each row's EOT token.
        start: index of the first learnable token (1: right after SOS).
        n_ctx, n_state: P and Q.
    """

    ids: Tensor
    eot: Tensor
    start: int
    n_ctx: int
    n_state: int


def build_skeleton(
    tokenize: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    n_ctx: int,
    n_state: int,
    class_aware: bool = True,
) -> PromptSkeleton:
    """Token ids ``[SOS] X*P X*Q <class words> [EOT] 0...`` for every class name.

    Args:
        tokenize: CLIP's tokenizer, ``list[str] -> (C, 77)`` ids (``Backbone.tokenize``).
        class_names: dataset class names (mapped by :func:`class_words`).
        n_ctx, n_state: P and Q.
        class_aware: False drops the class words (``[SOS] X*(P+Q) [EOT]``).

    The EOT is the largest id in each row (CLIP's vocabulary puts it last).
    """
    if n_ctx < 0 or n_state < 1:
        raise ValueError(f"need P >= 0 context and Q >= 1 state vectors, got {n_ctx}, {n_state}")
    texts = [template_text(n_ctx, n_state, class_words(c) if class_aware else "")
             for c in class_names]
    ids = tokenize(texts)
    eot = ids.argmax(dim=-1)
    n = n_ctx + n_state
    holder = tokenize([PLACEHOLDER])[0, 1]
    if not bool((ids[:, 1:1 + n] == holder).all()):
        raise ValueError(
            f"the tokenizer did not keep {n} single placeholder tokens after SOS for "
            f"{list(class_names)}; use CLIP's BPE tokenizer (Backbone.tokenize)"
        )
    if bool((eot == ids.shape[1] - 1).any()):
        raise ValueError(f"a prompt of {list(class_names)} fills all {ids.shape[1]} tokens (the "
                         "tokenizer may have cut it): shorten the class name")
    return PromptSkeleton(ids[:, : int(eot.max()) + 1], eot, 1, n_ctx, n_state)


def splice(token_emb: Tensor, ctx: Tensor, state: Tensor, start: int = 1) -> Tensor:
    """Replace the placeholder rows of a token-embedding sequence by learnable vectors.

    ``out[..., start:start+P, :] = ctx`` and ``out[..., start+P:start+P+Q, :] = state``; the
    other rows are ``token_emb``'s. Leading dimensions broadcast, so one call builds every
    (image, prompt, sample, state) sequence at once (one ``cat``, no Python loop).

    Args:
        token_emb: ``(..., L, W)`` embeddings of the skeleton ids.
        ctx: ``(..., P, W)``.
        state: ``(..., Q, W)``.

    Returns:
        ``(*broadcast(...), L, W)``.

    >>> e = torch.zeros(1, 6, 2)
    >>> splice(e, torch.ones(3, 2, 2), 2 * torch.ones(1, 1, 2))[..., 0].tolist()[1]
    [0.0, 1.0, 1.0, 2.0, 0.0, 0.0]
    """
    P, Q, W = ctx.shape[-2], state.shape[-2], token_emb.shape[-1]
    if start + P + Q > token_emb.shape[-2]:
        raise ValueError(f"{P}+{Q} learnable tokens do not fit a sequence of "
                         f"{token_emb.shape[-2]} tokens")
    lead = torch.broadcast_shapes(token_emb.shape[:-2], ctx.shape[:-2], state.shape[:-2])
    parts = (token_emb[..., :start, :], ctx, state, token_emb[..., start + P + Q:, :])
    return torch.cat([p.expand(*lead, p.shape[-2], W) for p in parts], dim=-2)


class PromptTemplates:
    """The token-id skeletons of class names, built once per class and kept.

    Args:
        tokenize: CLIP's tokenizer (``Backbone.tokenize``).
        n_ctx, n_state: P and Q.
        class_aware: see :func:`build_skeleton`.
    """

    def __init__(self, tokenize: Callable[[list[str]], Tensor], n_ctx: int, n_state: int,
                 class_aware: bool = True):
        self.tokenize, self.n_ctx, self.n_state = tokenize, n_ctx, n_state
        self.class_aware = class_aware
        self._rows: dict[str, tuple[Tensor, int]] = {}

    def __call__(self, class_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``(N, L)`` cut after the longest EOT of the batch, and EOT indices ``(N,)``."""
        missing = [c for c in dict.fromkeys(class_names) if c not in self._rows]
        if missing:
            sk = build_skeleton(self.tokenize, missing, self.n_ctx, self.n_state,
                                self.class_aware)
            for i, c in enumerate(missing):
                self._rows[c] = (sk.ids[i, : int(sk.eot[i]) + 1], int(sk.eot[i]))
        eot = torch.tensor([self._rows[c][1] for c in class_names], dtype=torch.long)
        ids = torch.zeros(len(class_names), int(eot.max()) + 1, dtype=torch.long)
        for i, c in enumerate(class_names):
            row = self._rows[c][0]
            ids[i, : row.numel()] = row
        return ids, eot


class PromptBank(nn.Module):
    """B context prompts and B normal / B abnormal state prompts (docs/reproduction.md, "Prompts").

    Init (docs/reproduction.md, "Prompts", the authors' ``trunc_normal_``): std 0.02 around mean 0
    (context), +0.5 (normal states), -0.5 (abnormal states); truncated at +-2 (absolute, as
    ``torch.nn.init.trunc_normal_`` does), which for the state means clips nothing.

    Args:
        n_prompts: B.
        n_ctx: P.
        n_state: Q.
        width: D, the text token-embedding width.
        generator: source of the init draws.
    """

    def __init__(self, n_prompts: int, n_ctx: int, n_state: int, width: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.context = nn.Parameter(torch.empty(n_prompts, n_ctx, width))
        self.normal = nn.Parameter(torch.empty(n_prompts, n_state, width))
        self.abnormal = nn.Parameter(torch.empty(n_prompts, n_state, width))
        for p, mean in ((self.context, 0.0), (self.normal, 0.5), (self.abnormal, -0.5)):
            nn.init.trunc_normal_(p, mean=mean, std=0.02, a=-2.0, b=2.0, generator=generator)

    @property
    def n_prompts(self) -> int:
        return self.context.shape[0]

    def sequences(self, token_emb: Tensor, isd: Tensor, iad: Tensor, start: int = 1,
                  banks: Tensor | None = None) -> Tensor:
        """Every prompt's embedding sequence for a batch (docs/reproduction.md, "Prompts").

        One ISD sample is added to all P context tokens, one IAD sample (normal flow for the
        normal prompt, abnormal flow for the abnormal one) to all Q state tokens.

        Args:
            token_emb: ``(N, L, D)`` skeleton embeddings, one row per image.
            isd: ``(R, N, D)`` ISD samples.
            iad: ``(2, R, N or 1, D)`` IAD samples (normal, abnormal); 1 shares them.
            start: first learnable position (after SOS).
            banks: indices of the prompts to build (default: all B).

        Returns:
            ``(N, B', R, 2, L, D)``; index 0 of the size-2 dim is normal, 1 abnormal.
        """
        ctx, states = self.context, torch.stack([self.normal, self.abnormal], dim=1)
        if banks is not None:
            ctx, states = ctx[banks], states[banks]
        # (N, B, R, 1, P, D): the same context (with its ISD sample) for both states.
        ctx = ctx[None, :, None, None] + isd.transpose(0, 1)[:, None, :, None, None, :]
        # (N, B, R, 2, Q, D)
        state = states[None, :, None] + iad.permute(2, 1, 0, 3)[:, None, :, :, None, :]
        return splice(token_emb[:, None, None, None], ctx, state, start)
