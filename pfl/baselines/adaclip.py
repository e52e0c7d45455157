"""AdaCLIP: hybrid (static + dynamic) learnable prompts in both towers, and hybrid semantic fusion.

docs/reproduction.md, "Peers" and appendix A.2; the method is Cao et al., "AdaCLIP: Adapting
CLIP with Hybrid Learnable Prompts for Zero-Shot Anomaly Detection" (ECCV 2024). Both CLIP
towers stay frozen; what learns is

* **static prompts**: for each of the first J blocks of each tower, n learnable tokens shared
  by all images (init normal, std 0.02);
* **dynamic prompts**: n tokens generated per image from its global feature (the frozen
  tower's, without prompts) by a linear map per tower; the same n tokens join every prompted
  block. The **hybrid** prompt of block j is ``static_j + dynamic(image)``;
* the patch adapters (one linear map per tapped layer, APRIL-GAN's
  :class:`~pfl.baselines.aprilgan.LayerAdapters`) and a linear map of the global feature.

The prompts enter the towers through the backbone's ``tokens_hook`` (:mod:`pfl.baselines.hooks`):
in the image tower they are extra tokens appended before block 0 and replaced before each of
the first J blocks (VPT-deep, :func:`~pfl.baselines.hooks.append_tokens`), in the text tower
they overwrite n placeholder tokens right after SOS before each of the first J blocks
(:func:`~pfl.baselines.hooks.overwrite_tokens`). Because the visual prompts change the
image tower, AdaCLIP cannot use cached features: it reads ``Batch.images``.

The text is AdaCLIP's small ensemble, 7 normal and 5 abnormal states (the WinCLIP state words)
in 4 templates, each prefixed by the n placeholders; the features of each state are the
normalised mean of its prompts' features. With dynamic text prompts they differ per image, so
the text tower runs once per image and prompt (48 short sequences per image).

Maps: per layer ``scale * <F_l, t_a - t_n>``; training uses the per-layer two-way softmax with
focal loss plus dice on both the abnormal map (against the mask) and the normal map (against
its complement), summed over layers, plus a focal loss on the image score; inference averages
the logits over layers before the softmax (AdaCLIP's aggregation).

**Hybrid semantic fusion** (HSF, :func:`hsf_paper` / :func:`hsf_official`) gives the image score
from the patch map: patches are clustered with k-means and a region-level feature ``c`` is
taken from the most abnormal region; the image feature becomes
``normalize(alpha c + (1 - alpha) g)`` (alpha = 0.2, g the adapted global feature) and the
score is the abnormal softmax of its similarities with the text.

Reproduced: static, dynamic and hybrid prompts in both towers (switchable: ``prompt_type``
"S"/"D"/"SD", ``branches`` "V"/"L"/"VL"); dynamic prompts from the frozen global feature by one
linear map per prompt token; the adapters and the global linear map; the losses; the
aggregation; HSF in the paper's form (default: k-means over the layer-averaged patch tokens,
the centroid of the cluster with the largest mean anomaly score) and in the authors' code's
"upgraded" form (``hsf="official"``: k-means over the 5k most abnormal patches, the mean of the
cluster centres).

Approximated:
  * Text prompts overwrite placeholder words ("X") from the first text block on; AdaCLIP
    overwrites the first n words of each sentence from the second block on.
  * Sizes are small so that training runs on CPU (n = 2 tokens, J = 3 blocks: the authors'
    trainer defaults; their scripts use more); J is capped at each tower's depth.
  * The logit scale is APRIL-GAN's weak-tower value (5) rather than AdaCLIP's 100
    (docs/reproduction.md, "Measured on this kind of machine"); ``logit_scale=100`` restores it.
  * k-means is scikit-learn's, seeded from the step's ``torch.Generator`` (deterministic); the
    authors' is unseeded. Gradients flow through the fused feature, not through the clustering.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor, nn

from pfl.baselines.aprilgan import LayerAdapters, pair_logit_diff, segmentation_loss
from pfl.baselines.hooks import append_tokens, overwrite_tokens
from pfl.baselines.winclip import WINCLIP_ABNORMAL_STATES, WINCLIP_NORMAL_STATES
from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.clip.zeroshot import state_prompts
from pfl.method.contract import Batch, Prediction, StepLoss
from pfl.method.losses import focal_loss
from pfl.method.prompts import PLACEHOLDER, class_words

# AdaCLIP's text ensemble: the WinCLIP state words (7 normal, 5 abnormal) in 4 templates.
ADACLIP_TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
)
HSF_MODES = ("paper", "official", "none")


def adaclip_sentences(words: str) -> tuple[list[str], list[str]]:
    """AdaCLIP's (normal, abnormal) sentences for one object name.

    >>> n, a = adaclip_sentences("bottle"); len(n), len(a), a[0]
    (28, 20, 'a bad photo of a damaged bottle.')
    """
    return (state_prompts(words, WINCLIP_NORMAL_STATES, ADACLIP_TEMPLATES),
            state_prompts(words, WINCLIP_ABNORMAL_STATES, ADACLIP_TEMPLATES))


def _kmeans_labels(points: Tensor, k: int, seed: int) -> np.ndarray:
    """scikit-learn k-means labels of ``points`` ``(M, D)`` with ``min(k, M)`` clusters."""
    data = points.detach().double().cpu().numpy()
    k = max(1, min(k, len(data)))
    with warnings.catch_warnings():
        # Fewer distinct points than clusters is harmless here (empty clusters are skipped).
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(data)


def hsf_paper(tokens: Tensor, scores: Tensor, k: int, seed: int = 0) -> Tensor:
    """HSF as the paper describes it: the centroid of the most abnormal k-means cluster.

    Args:
        tokens: ``(L, T, E)`` normalised patch tokens of one image (all tapped layers).
        scores: ``(T,)`` the patch anomaly map (abnormal probability).
        k: number of clusters (capped at T).
        seed: k-means seed.

    Returns:
        ``(E,)`` normalised: the mean of the layer-averaged tokens of the cluster whose mean
        anomaly score is the largest.
    """
    avg = tokens.mean(0)  # (T, E)
    labels = torch.as_tensor(_kmeans_labels(avg, k, seed), device=avg.device)
    ids = labels.unique()
    means = torch.stack([scores[labels == c].mean() for c in ids])
    best = ids[int(means.argmax())]
    return F.normalize(avg[labels == best].mean(0), dim=-1)


def hsf_official(tokens: Tensor, scores: Tensor, k: int, seed: int = 0) -> Tensor:
    """HSF as the authors' code does it ("upgraded"): centres of the most abnormal patches.

    The ``5 k`` patches with the largest anomaly scores are clustered by k-means on their
    tokens of all layers side by side; each cluster's centre is the mean of its members'
    tokens over members and layers; the result is the normalised mean of the centres.

    Args:
        tokens: ``(L, T, E)`` normalised patch tokens of one image.
        scores: ``(T,)`` the patch anomaly map.
        k: number of clusters.
        seed: k-means seed.

    Returns:
        ``(E,)`` normalised.
    """
    n_layers, n_tok, _ = tokens.shape
    top = scores.topk(min(n_tok, 5 * k)).indices
    picked = tokens[:, top]  # (L, m, E)
    labels = torch.as_tensor(
        _kmeans_labels(picked.permute(1, 0, 2).reshape(len(top), -1), k, seed),
        device=tokens.device)
    centres = [picked[:, labels == c].reshape(-1, picked.shape[-1]).mean(0)
               for c in labels.unique()]
    return F.normalize(torch.stack(centres).mean(0), dim=-1)


class SeededLinear(nn.Module):
    """``nn.Linear`` with its default init (uniform, bound ``1 / sqrt(in_dim)``) drawn from a
    given generator, so that building it leaves the global RNG alone."""

    def __init__(self, in_dim: int, out_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        for p in (self.weight, self.bias):
            nn.init.uniform_(p, -bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class AdaCLIPConfig:
    """AdaCLIP's settings (its paper and code; see the module docstring)."""

    n_prompts: int = 2  # n: prompt tokens per prompted block (AdaCLIP trainer default 2)
    depth: int = 3  # J: prompted blocks per tower, from the first (capped at the tower's depth)
    prompt_type: str = "SD"  # "S" static, "D" dynamic, "SD" hybrid
    branches: str = "VL"  # towers that get prompts: "V" image, "L" text, "VL" both
    hsf: str = "paper"  # "paper" | "official" (the authors' code) | "none": global feature only
    k_clusters: int = 20  # k of HSF's k-means (AdaCLIP: 20)
    hsf_alpha: float = 0.2  # weight of the region feature in the fused image feature
    hsf_train: bool = True  # HSF also in training (as AdaCLIP's forward does)
    logit_scale: float = 5.0  # AdaCLIP: 100; weak towers need a low scale (docs/reproduction.md)
    focal_gamma: float = 2.0
    init_std: float = 0.02  # std of the static prompts' normal init


class AdaCLIP(nn.Module):
    """AdaCLIP on the shared harness (:class:`pfl.method.contract.Method`); reads ``Batch.images``.

    Args:
        backbone: the frozen tower.
        cfg: :class:`AdaCLIPConfig`.
        generator: source of every init draw.
    """

    name = "AdaCLIP"
    needs_images = True  # the visual prompts change the image tower: no cached features

    def __init__(self, backbone: Backbone, cfg: AdaCLIPConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg = cfg or AdaCLIPConfig()
        if not cfg.prompt_type or set(cfg.prompt_type) - set("SD"):
            raise ValueError(f"AdaCLIPConfig.prompt_type must be 'S', 'D' or 'SD', got "
                             f"{cfg.prompt_type!r}")
        if set(cfg.branches) - set("VL"):
            raise ValueError(f"AdaCLIPConfig.branches must be made of 'V' and 'L', got "
                             f"{cfg.branches!r}")
        if cfg.hsf not in HSF_MODES:
            raise ValueError(f"AdaCLIPConfig.hsf must be one of {HSF_MODES}, got {cfg.hsf!r}")
        if cfg.n_prompts < 0 or cfg.depth < 0:
            raise ValueError("AdaCLIPConfig.n_prompts and depth must be >= 0")
        emb = backbone.embed_dim
        n = cfg.n_prompts
        widths = {"V": backbone.vision_width, "L": backbone.text_width}
        blocks = {"V": len(backbone.clip.visual.transformer.resblocks),
                  "L": len(backbone.clip.transformer.resblocks)}
        self.static = nn.ParameterDict()
        self.dynamic = nn.ModuleDict()
        for tower in cfg.branches:
            depth = min(cfg.depth, blocks[tower])
            if "S" in cfg.prompt_type:
                p = nn.Parameter(torch.empty(depth, n, widths[tower]))
                nn.init.normal_(p, std=cfg.init_std, generator=generator)
                self.static[tower] = p
            if "D" in cfg.prompt_type:
                # One linear map per prompt token, stacked: (E) -> (n * W).
                self.dynamic[tower] = SeededLinear(emb, n * widths[tower], generator)
        self.depths = {t: min(cfg.depth, blocks[t]) for t in cfg.branches}
        self.widths = widths
        self.adapters = LayerAdapters(len(backbone.layers), backbone.vision_width, emb, True,
                                      generator)
        self.global_map = LayerAdapters(1, emb, emb, True, generator)
        self.register_buffer("log_scale", torch.tensor(math.log(cfg.logit_scale)),
                             persistent=False)
        self._skeletons: dict[str, tuple[Tensor, Tensor, int]] = {}
        self._plain_text: dict[str, Tensor] = {}

    # --- the contract ------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                yield p

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Learning-rate groups of :func:`pfl.run.train.build_optimizer` (``official``): the static
        prompts as "prompts"; the prompt generators, adapters and global map as "rest"."""
        prompts = list(self.static.parameters())
        chosen = {id(p) for p in prompts}
        return {"prompts": prompts,
                "rest": [p for p in self.trainable_parameters() if id(p) not in chosen]}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        own = set(self.trainable_state_dict())
        if set(state) != own:
            raise ValueError(f"AdaCLIP state keys {sorted(state)} do not match this config's "
                             f"{sorted(own)}: load a state saved with the same AdaCLIPConfig")
        self.load_state_dict(state, strict=False)

    # --- prompts -----------------------------------------------------------------------------
    def prompts(self, tower: str, global_: Tensor) -> Tensor | None:
        """Hybrid prompts of ``tower`` ("V" or "L") for a batch: ``(J, N, n, W)``, or None.

        ``static[j] + dynamic(g)``: the dynamic part is the same for every prompted block.
        """
        if tower not in self.cfg.branches:
            return None
        n_img, depth, n = global_.shape[0], self.depths[tower], self.cfg.n_prompts
        parts = []
        if tower in self.static:
            parts.append(self.static[tower][:, None].expand(-1, n_img, -1, -1))
        if tower in self.dynamic:
            dyn = self.dynamic[tower](global_).view(n_img, n, self.widths[tower])
            parts.append(dyn[None].expand(depth, -1, -1, -1))
        return sum(parts)

    def _skeleton(self, words: str) -> tuple[Tensor, Tensor, int]:
        """Token ids ``(S, 77)``, EOT positions ``(S,)`` and the count of normal sentences of
        ``words``; with text prompts every sentence starts with n placeholders."""
        if words not in self._skeletons:
            normal, abnormal = adaclip_sentences(words)
            n = self.cfg.n_prompts if "L" in self.cfg.branches else 0
            texts = [" ".join([PLACEHOLDER] * n + [s]) for s in normal + abnormal]
            ids = self.backbone.tokenize(texts)
            if n:
                holder = self.backbone.tokenize([PLACEHOLDER])[0, 1]
                if not bool((ids[:, 1:1 + n] == holder).all()):
                    raise ValueError(f"the tokenizer did not keep {n} placeholder tokens after "
                                     f"SOS for {words!r}; use CLIP's BPE tokenizer")
            self._skeletons[words] = (ids, self.backbone.eot_positions(ids), len(normal))
        return self._skeletons[words]

    def _encode_sentences(self, words: list[str], prompts: Tensor | None) -> Tensor:
        """``(C, 2, E)`` (normal, abnormal) features for C rows of class words, each with its
        own prompts ``(J, C, n, W)`` (or none)."""
        skel = [self._skeleton(w) for w in words]
        ids = torch.stack([s[0] for s in skel])  # (C, S, 77)
        eot = torch.stack([s[1] for s in skel])  # (C, S)
        n_normal = skel[0][2]
        c, s = eot.shape
        device = self.backbone.clip.token_embedding.weight.device
        ids, eot = ids.reshape(c * s, -1).to(device), eot.reshape(c * s).to(device)
        hook = None if prompts is None else overwrite_tokens(prompts.repeat_interleave(s, dim=1))
        feats = self.backbone.encode_text_embeddings(self.backbone.token_embedding(ids), eot,
                                                     hook).view(c, s, -1)
        rows = [feats[:, :n_normal].mean(1), feats[:, n_normal:].mean(1)]
        return F.normalize(torch.stack(rows, dim=1), dim=-1)

    def text_features(self, cls_names: list[str], global_: Tensor) -> Tensor:
        """``(N, 2, E)`` normalised (normal, abnormal) text features for each image.

        Without text prompts: the frozen ensemble, cached per class. With static prompts only:
        encoded once per class in the batch. With dynamic prompts: once per image.
        """
        words = [class_words(c) for c in cls_names]
        prompts = self.prompts("L", global_)
        if prompts is None:
            for w in set(words) - set(self._plain_text):
                with torch.no_grad():
                    self._plain_text[w] = self._encode_sentences([w], None)[0]
            return torch.stack([self._plain_text[w] for w in words])
        if "L" in self.dynamic:
            return self._encode_sentences(words, prompts)
        unique = sorted(set(words))
        feats = self._encode_sentences(unique, prompts[:, : len(unique)])
        return feats[torch.tensor([unique.index(w) for w in words], device=feats.device)]

    def tower_features(self, batch: Batch) -> tuple[ImageFeatures, Tensor]:
        """The prompted towers' outputs: :class:`ImageFeatures` and ``(N, 2, E)`` text.

        With ``n_prompts = 0`` (or no prompted branch) they equal the frozen towers' own
        outputs (tested to 1e-5).
        """
        if batch.images is None:
            raise ValueError("AdaCLIP prompts the image tower, so it reads pixels: the Batch "
                             "needs images (cached features cannot carry visual prompts)")
        frozen = batch.features(self.backbone).global_  # input of the dynamic prompts
        visual = self.prompts("V", frozen)
        feats = (batch.features(self.backbone) if visual is None
                 else self.backbone.encode_image(
                     batch.images, append_tokens(visual, 1 + math.prod(self.backbone.grid))))
        return feats, self.text_features(batch.cls_names, frozen)

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Everything the maps need: adapted patch tokens ``(N, L, T, E)``, the adapted global
        feature ``(N, E)`` and the text ``(N, 2, E)``, all normalised."""
        feats, text = self.tower_features(batch)
        tokens = self.adapters(feats.patches)
        g = self.global_map(feats.global_[:, None, None].to(tokens))[:, 0, 0]
        return tokens, g, text.to(tokens)

    # --- maps and scores ---------------------------------------------------------------------
    def image_score(self, tokens: Tensor, g: Tensor, text: Tensor, patch_diff: Tensor,
                    generator: torch.Generator, fuse: bool = True) -> Tensor:
        """Abnormal probability per image ``(N,)`` from the (HSF-fused) image feature.

        Args:
            tokens: ``(N, L, T, E)``; g: ``(N, E)``; text: ``(N, 2, E)``.
            patch_diff: ``(N, T)`` layer-mean abnormal-minus-normal logits of the patches.
            generator: source of the k-means seed.
            fuse: False skips HSF (the global feature alone).
        """
        if fuse and self.cfg.hsf != "none":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            scores = torch.sigmoid(patch_diff).detach()
            fuse = hsf_paper if self.cfg.hsf == "paper" else hsf_official
            region = torch.stack([fuse(tokens[i], scores[i], self.cfg.k_clusters, seed)
                                  for i in range(tokens.shape[0])])
            a = self.cfg.hsf_alpha
            g = F.normalize(a * region + (1 - a) * g, dim=-1)
        return torch.sigmoid(self.log_scale.exp() * (g * (text[:, 1] - text[:, 0])).sum(-1))

    def _upsample(self, diff: Tensor) -> Tensor:
        """``(N, C, T)`` logit differences -> ``(N, C, S, S)`` (bilinear, exact for the softmax)."""
        n, c, _ = diff.shape
        return F.interpolate(diff.reshape(n, c, *self.backbone.grid),
                             size=(self.backbone.image_size,) * 2, mode="bilinear",
                             align_corners=False)

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        if batch.labels is None:
            raise ValueError("AdaCLIP trains an image-level term: the Batch needs labels")
        tokens, g, text = self.encode(batch)
        diff = pair_logit_diff(tokens, text, self.log_scale.exp())  # (N, L, T)
        probs = torch.sigmoid(self._upsample(diff))
        focal, dice = segmentation_loss(probs, batch.masks, self.cfg.focal_gamma,
                                        include_normal=True)
        score = self.image_score(tokens, g, text, diff.mean(1), generator,
                                 fuse=self.cfg.hsf_train)
        labels = batch.labels.to(score)
        cls = focal_loss(score[:, None, None], labels[:, None, None], self.cfg.focal_gamma)
        total = cls + focal + dice
        terms = {"cls": cls, "focal": focal, "dice": dice, "total": total}
        return StepLoss(total, {k: float(v.detach()) for k, v in terms.items()})

    def skip_predict(self, n_images: int, generator: torch.Generator) -> None:
        """Advance ``generator`` as :meth:`predict` on one batch would (its k-means seed), so a
        rank of a sharded evaluation starts where one process would be."""
        if self.cfg.hsf != "none":
            torch.randint(0, 2**31 - 1, (1,), generator=generator)

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        with torch.no_grad():
            tokens, g, text = self.encode(batch)
            diff = pair_logit_diff(tokens, text, self.log_scale.exp()).mean(1)  # (N, T)
            maps = torch.sigmoid(self._upsample(diff[:, None]))[:, 0]
            score = self.image_score(tokens, g, text, diff, generator)
        return Prediction(maps=maps, scores=score)
