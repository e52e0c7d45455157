"""WinCLIP (training-free): compositional prompt ensemble, sliding windows, harmonic aggregation.

docs/reproduction.md, "Peers" and appendix A.2: WinCLIP scores sub-images cut by windows of several
scales with CLIP's global (CLS) path, and each pixel's score is the harmonic mean of the
scores of the windows that cover it. The text side is the *compositional prompt ensemble*
(state words x templates), which APRIL-GAN and later peers reuse: :class:`PromptEnsemble`
encodes it once per class and caches it, so the other baselines import it from here.

How windows are formed (ViT, token selection): a window of ``k x k`` patches at grid position
``(r, c)`` keeps the CLS token and only the patch tokens inside it, each with its own
positional embedding, and drops the rest before the transformer; the window's feature is the
CLS output after ``ln_post`` and ``proj``. Windows slide with a stride of ``stride`` patches
and the last row/column of windows is pinned to the border, so every patch is covered. The
windows are batched: by default one image-tower call per window size holds every window of
that size of every image (equal lengths, so no padding); ``single_call=True`` sends all sizes
through ONE call, padding the shorter windows and masking the padding out of every attention
with an additive ``-inf`` key mask. Either way each row equals running the tower on that
window alone (tested); the padded call spends ~1/3 more tokens at scales (2, 3), so it is
not the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.clip.backbone import Backbone
from pfl.clip.zeroshot import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, state_prompts
from pfl.method.contract import Batch, Prediction, TrainingFree
from pfl.method.prompts import class_words

# WinCLIP's compositional prompt ensemble: the state words of pfl.clip.zeroshot plus WinCLIP's two
# extra normal states, and its template list (the three of pfl.clip.zeroshot plus the rest).
WINCLIP_NORMAL_STATES = NORMAL_STATES + ("{} without defect", "{} without damage")
WINCLIP_ABNORMAL_STATES = ABNORMAL_STATES
WINCLIP_TEMPLATES = TEMPLATES + (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
# Appendix A.1 ("Analysis of the prompt ensemble"): the single prompt (SP) pair.
SINGLE_PROMPTS = ("a photo of a perfect {}.", "a photo of a damaged {}.")
PROMPT_MODES = ("sp", "pe")


def ensemble_prompts(words: str, mode: str = "pe") -> tuple[list[str], list[str]]:
    """The (normal, abnormal) prompt lists for one object name.

    ``"pe"``: every WinCLIP state word in every template (7 x 22 normal, 5 x 22 abnormal);
    ``"sp"``: the single pair of appendix A.1.

    >>> n, a = ensemble_prompts("bottle", "sp"); n, a
    (['a photo of a perfect bottle.'], ['a photo of a damaged bottle.'])
    >>> [len(p) for p in ensemble_prompts("bottle", "pe")]
    [154, 110]
    """
    if mode == "sp":
        return [SINGLE_PROMPTS[0].format(words)], [SINGLE_PROMPTS[1].format(words)]
    if mode == "pe":
        return (state_prompts(words, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES),
                state_prompts(words, WINCLIP_ABNORMAL_STATES, WINCLIP_TEMPLATES))
    raise ValueError(f"unknown prompt mode {mode!r}: use one of {PROMPT_MODES}")


class PromptEnsemble:
    """Normal/abnormal text features per class, encoded once and cached (no gradients).

    Each state's feature is the L2-normalised mean of its prompts' normalised features
    (WinCLIP's ensemble; :func:`pfl.clip.zeroshot.text_pair` does the same for its short list).

    Args:
        backbone: the frozen tower whose text path encodes the prompts.
        mode: ``"pe"`` (prompt ensemble) or ``"sp"`` (single prompt), see
            :func:`ensemble_prompts`.
    """

    def __init__(self, backbone: Backbone, mode: str = "pe"):
        if mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {mode!r}: use one of {PROMPT_MODES}")
        self.backbone, self.mode = backbone, mode
        self._cache: dict[str, Tensor] = {}

    def encode(self, words: str) -> Tensor:
        """Fresh ``(2, E)`` features for ``words``: row 0 normal, row 1 abnormal."""
        with torch.no_grad():
            rows = [self.backbone.encode_text(p).mean(0)
                    for p in ensemble_prompts(words, self.mode)]
        return F.normalize(torch.stack(rows), dim=-1)

    def __call__(self, cls_names: list[str]) -> Tensor:
        """``(N, 2, E)`` features of each image's class, from the cache (filled on first use)."""
        rows = []
        for name in cls_names:
            words = class_words(name)
            if words not in self._cache:
                self._cache[words] = self.encode(words)
            rows.append(self._cache[words])
        return torch.stack(rows)


# --- windows -----------------------------------------------------------------------------------
def window_starts(size: int, k: int, stride: int = 1) -> list[int]:
    """Start indices of windows of side ``k`` over ``size`` cells; the last one ends at the border.

    >>> window_starts(8, 3, 2)
    [0, 2, 4, 5]
    """
    if not 1 <= k <= size or stride < 1:
        raise ValueError(f"window side {k} / stride {stride} do not fit a grid of {size}")
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] != size - k:
        starts.append(size - k)
    return starts


def window_indices(grid: tuple[int, int], k: int, stride: int = 1) -> Tensor:
    """Row-major patch indices of every ``k x k`` window: ``(n_windows, k*k)`` long.

    >>> window_indices((3, 3), 2).tolist()
    [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    """
    gh, gw = grid
    rows = []
    for r in window_starts(gh, k, stride):
        for c in window_starts(gw, k, stride):
            rows.append([(r + i) * gw + c + j for i in range(k) for j in range(k)])
    return torch.tensor(rows, dtype=torch.long)


def window_membership(windows: Tensor, n_patches: int) -> Tensor:
    """``(n_windows, T)`` 0/1 matrix: entry ``(w, t)`` is 1 when window ``w`` covers patch ``t``."""
    member = torch.zeros(windows.shape[0], n_patches)
    member.scatter_(1, windows, 1.0)
    return member


def harmonic_aggregation(scores: Tensor, membership: Tensor, eps: float = 1e-12) -> Tensor:
    """Each patch's score: the harmonic mean of the scores of the windows covering it.

    ``M(t) = n_t / sum_{w covers t} 1 / s_w`` with ``n_t`` the number of such windows.

    Args:
        scores: ``(N, n_windows)`` window scores in (0, 1].
        membership: ``(n_windows, T)`` from :func:`window_membership`.
        eps: scores are clamped to at least ``eps`` before the reciprocal.

    Returns:
        ``(N, T)``.

    >>> m = window_membership(window_indices((2, 3), 2), 6)
    >>> harmonic_aggregation(torch.tensor([[0.5, 0.25]]), m).tolist()
    [[0.5, 0.3333333432674408, 0.25, 0.5, 0.3333333432674408, 0.25]]
    """
    count = membership.sum(0)
    if bool((count == 0).any()):
        raise ValueError("some patches are covered by no window; check the window scales/stride")
    inv = scores.clamp_min(eps).reciprocal() @ membership.to(scores)
    return count.to(scores) / inv


def encode_windows(backbone: Backbone, images: Tensor, windows: list[Tensor],
                   chunk: int | None = None, single_call: bool = False) -> Tensor:
    """CLS features of every window of every image (see the module docstring for the batching).

    Args:
        backbone: the frozen tower (a standard open_clip ViT with CLS pooling).
        images: ``(N, 3, S, S)`` CLIP-normalised.
        windows: per scale, ``(n_windows_s, k_s^2)`` patch indices (:func:`window_indices`).
        chunk: at most this many window sequences per transformer call (memory cap).
        single_call: all window sizes in one padded, masked call.

    Returns:
        ``(N, sum_s n_windows_s, E)`` projected window features (not normalised), windows in
        the order of ``windows``.
    """
    if not single_call and len({w.shape[1] for w in windows}) > 1:
        return torch.cat([encode_windows(backbone, images, [w], chunk, True) for w in windows],
                         dim=1)
    visual = backbone.clip.visual
    with torch.no_grad():
        x = visual.conv1(images.to(backbone.dtype)).flatten(2).transpose(1, 2)  # (N, T, W)
        pos = visual.positional_embedding.to(x.dtype)
        x = x + pos[1:]
        cls = (visual.class_embedding.to(x.dtype) + pos[0]).view(1, 1, -1)
        longest = max(w.shape[1] for w in windows)
        padded = any(w.shape[1] < longest for w in windows)
        idx = torch.cat([F.pad(w, (0, longest - w.shape[1])) for w in windows]).to(x.device)
        valid = torch.cat([torch.arange(longest).expand(w.shape[0], -1) < w.shape[1]
                           for w in windows]).to(x.device)  # (n_win, longest)
        n, n_win = x.shape[0], idx.shape[0]
        seq = torch.cat([cls.expand(n * n_win, 1, -1),
                         x[:, idx].reshape(n * n_win, longest, -1)], dim=1)
        seq = visual.ln_pre(seq)
        # Additive key mask: padded keys get -inf for every query and head.
        key_ok = torch.cat([valid.new_ones(n_win, 1), valid], dim=1)  # (n_win, 1 + longest)
        mask = torch.zeros(key_ok.shape, dtype=seq.dtype, device=seq.device)
        mask = mask.masked_fill(~key_ok, float("-inf"))
        heads = visual.transformer.resblocks[0].attn.num_heads
        size = 1 + longest
        step = chunk or n * n_win
        out = []
        for start in range(0, n * n_win, step):
            part = seq[start:start + step]
            m = None
            if padded:
                rows = torch.arange(start, start + part.shape[0], device=seq.device) % n_win
                m = mask[rows][:, None, None, :].expand(-1, heads, size, -1)
                m = m.reshape(-1, size, size)
            out.append(visual.transformer(part, attn_mask=m)[:, 0])
        cls_out = visual.ln_post(torch.cat(out)) @ visual.proj
    return cls_out.reshape(n, n_win, -1)


# --- the method --------------------------------------------------------------------------------
@dataclass
class WinCLIPConfig:
    """WinCLIP's zero-shot settings (docs/reproduction.md, "Peers"; appendix A.2)."""

    scales: tuple[int, ...] = (2, 3)  # window sides in patches (WinCLIP: small and mid scale)
    stride: int = 1  # window step in patches
    prompts: str = "pe"  # "pe" compositional prompt ensemble | "sp" single prompt pair
    logit_scale: float | None = None  # None: the tower's own exp(logit_scale) (100 for OpenAI)
    include_global: bool = True  # the image-scale (CLS) score joins the mean over scales
    scale_mean: str = "harmonic"  # how the per-scale maps are combined: "harmonic" | "arithmetic"
    window_chunk: int | None = None  # at most this many window sequences per tower call
    single_call: bool = False  # all window sizes in one padded, masked tower call


class WinCLIP(TrainingFree, nn.Module):
    """Training-free WinCLIP on the shared harness (:class:`pfl.method.contract.Method`).

    Per image: the class's (normal, abnormal) ensemble features t_n, t_a; each window w's
    score s_w = softmax(scale * <f_w, t_n>, scale * <f_w, t_a>)[abnormal]; per scale the patch
    map is the harmonic aggregation of the window scores (:func:`harmonic_aggregation`); the
    scales (and, with ``include_global``, the image-level score as a constant map) are
    combined by ``scale_mean``; the grid map is upsampled bilinearly to the image size. The
    image score is the global CLS score.

    Note:
        WinCLIP needs pixels (``Batch.images``): windows cannot be cut from cached features.
        The few-shot (WinCLIP+) branch with reference images is not part of zero-shot.
    """

    name = "WinCLIP"
    needs_images = True  # the harness then serves Batch.images (pfl.run.features, pfl.run.evaluate)

    def __init__(self, backbone: Backbone, cfg: WinCLIPConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg or WinCLIPConfig()
        if self.cfg.scale_mean not in ("harmonic", "arithmetic"):
            raise ValueError(f"scale_mean must be 'harmonic' or 'arithmetic', "
                             f"got {self.cfg.scale_mean!r}")
        self.text = PromptEnsemble(backbone, self.cfg.prompts)
        t = backbone.grid[0] * backbone.grid[1]
        self.windows = [window_indices(backbone.grid, k, self.cfg.stride) for k in self.cfg.scales]
        self.memberships = [window_membership(w, t) for w in self.windows]

    @property
    def logit_scale(self) -> float:
        if self.cfg.logit_scale is not None:
            return float(self.cfg.logit_scale)
        return float(self.backbone.clip.logit_scale.exp())

    def _score(self, feats: Tensor, text: Tensor) -> Tensor:
        """feats (N, ..., E) unnormalised, text (N, 2, E) -> abnormal probability (N, ...)."""
        f = F.normalize(feats, dim=-1)
        diff = text[:, 1] - text[:, 0]
        shape = (f.shape[0],) + (1,) * (f.dim() - 2) + (diff.shape[-1],)
        return torch.sigmoid(self.logit_scale * (f * diff.view(shape)).sum(-1))

    def patch_maps(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-scale grid maps ``(N, n_scales, T)`` and image scores ``(N,)``."""
        if batch.images is None:
            raise ValueError("WinCLIP cuts windows from pixels: the Batch needs images, not only "
                             "cached feats (build it with images=...)")
        text = self.text(batch.cls_names).to(batch.images.device)
        glob = self._score(batch.features(self.backbone).global_, text)  # (N,)
        win = self._score(encode_windows(self.backbone, batch.images, self.windows,
                                         self.cfg.window_chunk, self.cfg.single_call),
                          text)  # (N, n_win)
        maps, start = [], 0
        for w, member in zip(self.windows, self.memberships):
            part = win[:, start:start + w.shape[0]]
            maps.append(harmonic_aggregation(part, member.to(part.device)))
            start += w.shape[0]
        return torch.stack(maps, dim=1), glob

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        with torch.no_grad():
            maps, glob = self.patch_maps(batch)
            if self.cfg.include_global:
                maps = torch.cat([maps, glob[:, None, None].expand(-1, 1, maps.shape[-1])], 1)
            if self.cfg.scale_mean == "harmonic":
                grid_map = maps.shape[1] / maps.clamp_min(1e-12).reciprocal().sum(1)
            else:
                grid_map = maps.mean(1)
            gh, gw = self.backbone.grid
            up = F.interpolate(grid_map.reshape(-1, 1, gh, gw), size=batch.images.shape[-2:],
                               mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps=up, scores=glob)
