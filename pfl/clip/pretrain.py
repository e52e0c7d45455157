"""Contrastive pretraining of the tiny CLIP on procedural patterns, with a dense region-text term.

No pretrained CLIP can be had offline, and a random-init tower is no stand-in (docs/reproduction.md,
"Measured on this kind of machine"). This module pretrains the ``pfl-tiny`` open_clip config
the way CLIP was trained (Radford et al., 2021): a symmetric InfoNCE loss between image and
caption features with a learnable temperature. The image-caption pairs are drawn on the fly
from the benchmark's ``pretrain`` domain only: procedural patterns (:mod:`pfl.data.patterns`) with
defects painted by :mod:`pfl.data.defects`. Nothing of the ``aux``, ``target`` or ``medical``
domains (photographs) can enter: the generator imports neither :mod:`pfl.data.synthetic` nor any
image file, and the caption vocabulary holds no category word of those domains (tested).

Optionally (``photos`` and ``photo_share``, off by default) a share of the pairs
comes from photographs a Debian package installs (:mod:`pfl.data.photos`: stamps composited
on low-contrast backgrounds, captioned with their description's noun words); the photos that
equal a benchmark source or look like a target or medical category are left out, and the
record lists the folder, the package and version, the counts and a hash of the photos used.

Three choices differ from CLIP, each for a measured reason:

- **Pairs.** Every batch holds ``batch`` pairs: one pattern image, flawless and with one
  painted defect, captioned with the same template and noun and different state words
  ("a photo of a flawless zigzag pattern." / "a photo of a scratched zigzag pattern."). Plain
  global contrast mostly separates the pattern words; pairs make the state the thing to learn.
- **Soft targets.** Identical captions in a batch are all positives: the target of image i
  over captions j is uniform over the j whose caption equals i's (and symmetrically).
- **Dense region-text term** (this project's deviation from CLIP, ``dense_weight``): the painted
  masks are free supervision, so the last block's patch tokens, mapped into the joint space by
  ``ln_post`` and the projection (as WinCLIP and APRIL-GAN use them), are pulled toward the
  pair's defect caption inside the defect and toward its normal caption outside. Per patch,
  a two-way softmax over (normal text, defect text) is fit by a class-balanced binary cross
  entropy to the fraction of the patch the mask covers. Global contrast alone left zero-shot
  maps at chance at this scale (docs/reproduction.md, "Measured on this kind of machine").

Training is deterministic for a seed on CPU with a fixed thread count: the batch of step t is
drawn from ``np.random.default_rng([seed, t])``, so a run resumed from a checkpoint repeats the
uninterrupted run exactly. A checkpoint is one safetensors file (weights, optimizer moments,
torch RNG state; its header holds the JSON state) with ``history.csv`` beside it, written as
one resume point: a hidden folder published by one atomic rename (:func:`pfl.utils.write_point`,
the mechanism of :func:`pfl.run.train.fit`). Leftovers of killed writes are removed when a run
starts; tests/test_resume.py kills a run between every two disk writes and resumes it.

    >>> cfg = PretrainConfig(batch=2, image_size=56, final_size=None)
    >>> b = make_batch(cfg, step=0)
    >>> tuple(b.images.shape), tuple(b.fractions.shape), len(b.captions)
    ((4, 3, 56, 56), (4, 16), 4)
    >>> b.captions[:2]
    ['a photo of a unblemished plaid pattern.', 'a photo of a flawed plaid pattern.']
    >>> b.kinds[:2]
    ['', 'scratch']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from torch import nn

from pfl.clip.backbone import TINY_WEIGHTS, _quiet_open_clip, load_weights, register_configs
from pfl.data.defects import DEFECT_KINDS, paint_defect
from pfl.data.patterns import PATTERNS, pattern_image
from pfl.data.photos import DEFAULT_ROOT as DEFAULT_PHOTOS
from pfl.data.photos import draw_photo_pair, load_rgba, photo_record, photo_set
from pfl.data.preprocess import CLIP_MEAN, CLIP_STD
from pfl.utils import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default_dtype,
    latest_point,
    remove_stale,
    write_point,
)

log = logging.getLogger(__name__)

# --- the caption vocabulary ---------------------------------------------------------------------
# Phrasings cover those of hand-written zero-shot prompts (adjective before the noun, "with ..."
# after it), as web captions would have covered them for CLIP; see pfl.clip.zeroshot.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "there is a {}.",
)
GENERIC_NOUNS: tuple[str, ...] = ("object", "surface", "texture", "pattern")
NORMAL_STATES: tuple[str, ...] = (
    "flawless {}", "perfect {}", "unblemished {}", "intact {}", "clean {}",
    "{} without flaw", "{} without defect", "{}",
)
GENERIC_DEFECT_STATES: tuple[str, ...] = (
    "damaged {}", "defective {}", "flawed {}", "{} with flaw", "{} with defect",
    "{} with damage",
)
# Kind-specific states: an adjective, or a noun phrase after "with".
KIND_STATES: dict[str, tuple[str, ...]] = {
    "scratch": ("scratched {}", "{} with a scratch"),
    "hole": ("holed {}", "spotted {}", "{} with a hole"),
    "stain": ("stained {}", "{} with a stain"),
    "cut_paste": ("damaged {}", "{} with a misplaced piece"),
    "blend": ("cracked {}", "contaminated {}", "{} with a crack"),
    "missing": ("broken {}", "{} with a missing piece"),
}


def caption_vocabulary() -> set[str]:
    """Every word a pretraining caption can contain (lower case, punctuation stripped)."""
    parts = TEMPLATES + GENERIC_NOUNS + NORMAL_STATES + GENERIC_DEFECT_STATES + PATTERNS
    parts += tuple(s for states in KIND_STATES.values() for s in states)
    words = " ".join(parts).replace("{}", " ").replace(".", " ").lower().split()
    return set(words)


@dataclass
class PretrainConfig:
    """One pretraining run; every field is recorded with the shipped weights."""

    steps: int = 1000  # optimizer steps in all (both phases)
    batch: int = 16  # pairs per step: 2 * batch images and captions
    image_size: int = 112  # training side of phase 1; positional embeddings resize on load
    final_size: int | None = 224  # phase 2 side (None: one phase); the smoke profile's size
    final_steps: int = 150  # steps at final_size, at the end
    final_batch: int = 6  # pairs per step in phase 2
    zoom: float = 0.5  # share of pairs drawn at twice the side and cropped: pixel scale of 224
    defect_area: tuple[float, float] = (0.005, 0.08)  # fraction of the image; eval: 0.002-0.05
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 100  # linear warm-up steps, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1  # on matrices only (not embeddings, gains, biases, scales)
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's
    eps: float = 1e-6  # CLIP's
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's learnable temperature init
    dense_weight: float = 1.0  # weight of the dense region-text term; 0: plain CLIP
    init_dense_scale: float = math.log(10.0)  # learnable temperature of the dense term
    model_name: str = "pfl-tiny"  # open_clip config shipped in pfl/clip/assets
    init_seed: int = 0  # random init of the tower
    seed: int = 0  # data stream: the batch of step t comes from default_rng([seed, t])
    threads: int = 1  # torch.set_num_threads; CPU results are exact for a fixed count
    checkpoint_every: int = 50  # steps between checkpoints
    photos: str | None = None  # folder of photo stamps (pfl.data.photos); None: patterns only
    photo_share: float = 0.0  # share of pairs drawn from the photos; 0: patterns only
    # open_clip weights to continue from (e.g. the shipped pfl/clip/assets/tiny_clip.safetensors,
    # its learned temperature included); None: the seeded random init
    init_weights: str | None = None

    def __post_init__(self):
        self.defect_area = tuple(self.defect_area)
        self.betas = tuple(self.betas)
        if not 0.0 <= self.photo_share <= 1.0:
            raise ValueError(f"photo_share={self.photo_share} must lie in [0, 1]")
        if self.photo_share > 0 and not self.photos:
            raise ValueError(f"photo_share={self.photo_share} needs a photo folder: pass "
                             f"--photos {DEFAULT_PHOTOS} (or another folder of stamps)")
        if self.final_size is not None and not 0 <= self.final_steps <= self.steps:
            raise ValueError(f"final_steps={self.final_steps} must lie in 0..steps={self.steps}")

    @property
    def switch_step(self) -> int:
        """First step of phase 2 (``steps`` when there is one phase)."""
        if self.final_size is None or self.final_steps == 0:
            return self.steps
        return self.steps - self.final_steps

    def phase(self, step: int) -> tuple[int, int]:
        """(image side, pairs) used at ``step``."""
        if step >= self.switch_step:
            return self.final_size, self.final_batch
        return self.image_size, self.batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PretrainConfig fields {sorted(unknown)}")
        return cls(**d)


# --- data ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One step's data: ``2 * pairs`` images, normal at even rows and defective at odd rows.

    images: (2P, 3, S, S) CLIP-normalised; masks: (2P, S, S) 0/1; fractions: (2P, T) share of
    each patch (row-major grid, as the tokens) covered by the mask; captions, states,
    patterns, kinds: per image (kind "" for a normal image; pattern: the pattern's name, or a
    photo's noun phrase).
    """

    images: torch.Tensor
    masks: torch.Tensor
    fractions: torch.Tensor
    captions: list[str]
    states: list[str]
    patterns: list[str]
    kinds: list[str]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def caption_pair(rng: np.random.Generator, pattern: str, kind: str,
                 photo: bool = False) -> tuple[str, str, str, str]:
    """(normal caption, defect caption, normal state, defect state) sharing template and noun.

    ``photo``: ``pattern`` is a photo's noun phrase (pfl.data.photos), used as the noun as is.

    >>> n, d, _, _ = caption_pair(np.random.default_rng(3), "zigzag", "scratch")
    >>> n
    'a dark photo of the flawless zigzag pattern.'
    >>> d
    'a dark photo of the zigzag pattern with damage.'
    """
    template = _pick(rng, TEMPLATES)
    if photo:
        noun = pattern
    else:
        u = rng.uniform()
        noun = (f"{pattern} pattern" if u < 0.4 else f"{pattern} texture" if u < 0.55
                else pattern if u < 0.75 else _pick(rng, GENERIC_NOUNS))
    normal = _pick(rng, NORMAL_STATES)
    defect = _pick(rng, KIND_STATES[kind] if rng.uniform() < 0.5 else GENERIC_DEFECT_STATES)
    return (template.format(normal.format(noun)), template.format(defect.format(noun)),
            normal, defect)


def draw_pair(rng: np.random.Generator, size: int, zoom: float,
              area: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str]:
    """One pattern image flawless and defective: (normal, defective, mask, pattern, kind).

    With probability ``zoom`` the pattern is drawn at twice the side and a random quarter is
    cropped, so the pixels look as they do at twice the training side (the evaluation side).
    """
    pattern = _pick(rng, PATTERNS)
    if rng.uniform() < zoom:
        big = pattern_image(pattern, rng, 2 * size)
        y, x = rng.integers(0, size + 1, size=2)
        image = np.ascontiguousarray(big[y:y + size, x:x + size])
    else:
        image = pattern_image(pattern, rng, size)
    for _ in range(5):  # a uniform crop can be too flat for a visible defect: redraw the kind
        try:
            defective, mask, kind = paint_defect(image, rng, area=area)
            break
        except ValueError:
            continue
    else:
        raise RuntimeError(f"no visible defect on a {pattern} image after 5 kinds")
    return image, defective, mask, pattern, kind


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) CLIP-normalised float (no resize)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_fractions(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, S, S) 0/1 masks -> (N, T) share of each patch covered, row-major like the tokens.

    >>> m = torch.zeros(1, 4, 4); m[0, :2, :1] = 1
    >>> patch_fractions(m, 2).tolist()
    [[0.5, 0.0, 0.0, 0.0]]
    """
    return F.avg_pool2d(masks[:, None], patch).flatten(1)


def draw_batch(cfg: PretrainConfig, step: int) -> tuple:
    """The raw data of ``step`` (numpy, picklable for worker processes): a function of
    (cfg, step) only, so resuming is exact and the worker count does not matter."""
    rng = np.random.default_rng([cfg.seed, step])
    size, pairs = cfg.phase(step)
    # Zoomed draws give phase 1 the pixel scale of the evaluation side; phase 2 is at that side.
    zoom = cfg.zoom if size == cfg.image_size else 0.0
    imgs, masks, caps, states, pats, kinds = [], [], [], [], [], []
    for _ in range(pairs):
        # The share test draws from the stream only when photos are on: share 0 keeps the
        # patterns-only stream bit for bit.
        if cfg.photo_share > 0 and rng.uniform() < cfg.photo_share:
            photo = _pick(rng, photo_set(cfg.photos).photos)
            normal, defective, mask, kind = draw_photo_pair(load_rgba(photo.path), rng, size,
                                                            cfg.defect_area)
            pattern = photo.noun
            cn, cd, sn, sd = caption_pair(rng, pattern, kind, photo=True)
        else:
            normal, defective, mask, pattern, kind = draw_pair(rng, size, zoom, cfg.defect_area)
            cn, cd, sn, sd = caption_pair(rng, pattern, kind)
        imgs += [normal, defective]
        masks += [np.zeros_like(mask), mask]
        caps += [cn, cd]
        states += [sn, sd]
        pats += [pattern, pattern]
        kinds += ["", kind]
    return np.stack(imgs), np.stack(masks), caps, states, pats, kinds


def assemble(raw: tuple, patch: int = 14) -> Batch:
    """:func:`draw_batch` output -> :class:`Batch` (tensors)."""
    imgs, masks, caps, states, pats, kinds = raw
    m = torch.from_numpy(masks.astype(np.float32))
    return Batch(_to_tensor(imgs), m, patch_fractions(m, patch), caps, states, pats, kinds)


def make_batch(cfg: PretrainConfig, step: int, patch: int = 14) -> Batch:
    """The batch of ``step``."""
    return assemble(draw_batch(cfg, step), patch)


def batch_stream(cfg: PretrainConfig, start: int, end: int, workers: int = 0, patch: int = 14):
    """Batches of steps start..end-1 in order; ``workers`` > 0 draws them in processes,
    at most ``2 * workers`` ahead. The batches do not depend on ``workers``."""
    if workers <= 0:
        for step in range(start, end):
            yield make_batch(cfg, step, patch)
        return
    import multiprocessing as mp
    from collections import deque

    with mp.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        nxt = start
        for _ in range(start, end):
            while nxt < end and len(pending) < 2 * workers:
                pending.append(pool.apply_async(draw_batch, (cfg, nxt)))
                nxt += 1
            yield assemble(pending.popleft().get(), patch)


# --- model --------------------------------------------------------------------------------------
def init_clip(model_name: str = "pfl-tiny", image_size: int = 224, init_seed: int = 0) -> nn.Module:
    """A seeded random-init open_clip model (never the shipped weights), without touching the
    caller's global RNG stream. The "random tower" of the benchmarks."""
    register_configs()
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(init_seed)
        return open_clip.create_model(model_name, pretrained=None, force_image_size=image_size)


def encode_images(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, S, S) -> (global (N, E), patch tokens (N, T, E)), both in the joint space.

    Both pass ``ln_post`` and the projection: the CLS token as in CLIP, the patch tokens as
    WinCLIP and APRIL-GAN use them. Not normalised.
    """
    v = clip.visual
    x = v.ln_post(v.transformer(v._embeds(images)))
    x = x @ v.proj
    return x[:, 0], x[:, 1:]


def encode_texts(clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(N, 77) token ids -> (N, E) text features, not normalised.

    Cut after the longest EOT: the causal mask makes this equal to the full pass
    (docs/reproduction.md, "Prompts").
    """
    eot = ids.argmax(dim=-1)
    n = int(eot.max()) + 1
    x = clip.token_embedding(ids[:, :n]) + clip.positional_embedding[:n]
    x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
    x = clip.ln_final(x)[torch.arange(len(ids), device=ids.device), eot]
    return x @ clip.text_projection


# --- losses -------------------------------------------------------------------------------------
def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                   logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with equal captions as positives.

    img, txt: (N, E) normalised, row i of each from sample i; labels (N,) caption ids (equal
    captions share an id); logit_scale: log of the inverse temperature. The target of image i
    over texts is uniform over {j: labels[j] == labels[i]} (a one-hot when captions are unique,
    which gives CLIP's loss exactly); the same for texts over images.
    """
    logits = logit_scale.exp() * img @ txt.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def dense_loss(patches: torch.Tensor, t_normal: torch.Tensor, t_defect: torch.Tensor,
               fractions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE of the per-patch two-way softmax against the mask fraction.

    patches: (N, T, E) normalised patch tokens; t_normal, t_defect: (N, E) normalised texts of
    each image's pair; fractions: (N, T) in [0, 1]; scale: log of the inverse temperature.
    p = softmax(s <x, t_n>, s <x, t_d>)[1] = sigmoid(s <x, t_d - t_n>). Defect and normal
    patches each weigh one half, whatever their counts (defects cover a few percent).
    """
    logit = scale.exp() * torch.einsum("nte,ne->nt", patches, t_defect - t_normal)
    pos = fractions.sum().clamp_min(1e-6)
    neg = (1 - fractions).sum().clamp_min(1e-6)
    lp, ln = F.logsigmoid(logit), F.logsigmoid(-logit)
    return -0.5 * ((fractions * lp).sum() / pos + ((1 - fractions) * ln).sum() / neg)


class Pretrainer(nn.Module):
    """The CLIP model plus the dense term's temperature: everything the optimizer updates."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = init_clip(cfg.model_name, cfg.image_size, cfg.init_seed)
        if cfg.init_weights:
            load_weights(self.clip, Path(cfg.init_weights))  # keeps their logit scale
        else:
            with torch.no_grad():
                self.clip.logit_scale.fill_(cfg.init_logit_scale)
        self.dense_scale = nn.Parameter(torch.tensor(float(cfg.init_dense_scale)))
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        self.patch = self.clip.visual.patch_size[0]

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"loss", "global", "dense"} for one batch (dense is 0 when its weight is 0)."""
        unique = sorted(set(batch.captions))
        index = {c: i for i, c in enumerate(unique)}
        dev = self.dense_scale.device
        labels = torch.tensor([index[c] for c in batch.captions], device=dev)
        txt = F.normalize(encode_texts(self.clip, self.tokenizer(unique).to(dev)), dim=-1)
        g, p = encode_images(self.clip, batch.images.to(dev))
        g, p = F.normalize(g, dim=-1), F.normalize(p, dim=-1)
        scale = self.clip.logit_scale.clamp(max=math.log(100))
        out = {"global": soft_clip_loss(g, txt[labels], labels, scale)}
        if self.cfg.dense_weight > 0:
            pair_normal = labels.view(-1, 2)[:, 0].repeat_interleave(2)
            pair_defect = labels.view(-1, 2)[:, 1].repeat_interleave(2)
            out["dense"] = dense_loss(p, txt[pair_normal], txt[pair_defect],
                                      batch.fractions.to(dev),
                                      self.dense_scale.clamp(max=math.log(100)))
        else:
            out["dense"] = torch.zeros((), device=dev)
        out["loss"] = out["global"] + self.cfg.dense_weight * out["dense"]
        return out


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "embedding" in name or "scale" in name


def make_optimizer(model: Pretrainer) -> torch.optim.AdamW:
    cfg = model.cfg
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``steps``.

    >>> c = PretrainConfig(steps=1000, warmup=100, lr=1.0, min_lr_ratio=0.0)
    >>> learning_rate(c, 0), learning_rate(c, 99), round(learning_rate(c, 550), 6)
    (0.01, 1.0, 0.5)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * t))


def _resize_tokens(x: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """(1 + g*g, W) CLS + grid rows -> (1 + grid*grid, W), interpolating the grid."""
    g = int(round(math.sqrt(x.shape[0] - 1)))
    img = x[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    kw = {"antialias": True} if mode == "bicubic" else {}
    img = F.interpolate(img, size=(grid, grid), mode=mode, align_corners=False, **kw)
    return torch.cat([x[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def set_image_size(model: Pretrainer, optimizer: torch.optim.Optimizer, size: int) -> None:
    """Switch the tower to ``size``: resize the positional embedding (bicubic, as open_clip
    does on load) and its Adam moments (first bicubic; second bilinear, which keeps it >= 0)."""
    v = model.clip.visual
    grid = size // v.patch_size[0]
    if tuple(v.grid_size) == (grid, grid):
        return
    old = v.positional_embedding
    sd = {"visual.positional_embedding": old.detach().clone()}
    v.grid_size = (grid, grid)
    v.image_size = (size, size)
    resize_pos_embed(sd, model.clip)
    # A new Parameter (autograd caches a leaf's shape), swapped into the optimizer in place.
    new = nn.Parameter(sd["visual.positional_embedding"])
    v.positional_embedding = new
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, {})
    if "exp_avg" in state:
        state["exp_avg"] = _resize_tokens(state["exp_avg"], grid, "bicubic")
        state["exp_avg_sq"] = _resize_tokens(state["exp_avg_sq"], grid, "bilinear")
        optimizer.state[new] = state


# --- checkpoints --------------------------------------------------------------------------------
CHECKPOINT = "checkpoint.safetensors"
HISTORY_CSV = "history.csv"
RESUME = "resume"  # out/resume/<generation>/ holds the newest checkpoint and its history.csv
HISTORY_FIELDS = ("step", "loss", "global", "dense", "lr", "logit_scale", "dense_scale", "size")


def save_point(out: Path, model: Pretrainer, optimizer: torch.optim.Optimizer,
               step: int, history: list[dict]) -> Path:
    """Publish ``out/resume/<generation>/``: ``checkpoint.safetensors`` (weights, Adam moments,
    torch RNG; JSON state in its header) and ``history.csv``, as one atomic unit."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous()
               for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps = {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        if st:
            tensors[f"optim.{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
            tensors[f"optim.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
            steps[i] = float(st["step"])
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "config": model.cfg.to_dict(), "optim_steps": steps,
            "history": history, "image_size": model.clip.visual.image_size[0]}
    text = _history_text(history)
    return write_point(Path(out) / RESUME, {
        CHECKPOINT: lambda p: save_file(tensors, p, metadata={"state": json.dumps(meta)}),
        HISTORY_CSV: lambda p: Path(p).write_text(text),
    })


def resume_point(out: str | Path) -> Path | None:
    """The newest resume point of the run in ``out``, or None (a fresh run).

    Removes leftovers of killed writes first. A run of an older pfl version, which kept one
    ``out/checkpoint.safetensors`` (always whole: it was written atomically), is converted
    into a point; its ``history.csv`` goes with it unless the run was finished.
    """
    out = Path(out)
    remove_stale(out)
    remove_stale(out / RESUME, points=True)
    point = latest_point(out / RESUME)
    old = out / CHECKPOINT
    if point is None and old.is_file():
        from safetensors import safe_open

        with safe_open(str(old), framework="pt") as f:
            text = _history_text(json.loads(f.metadata()["state"])["history"])
        point = write_point(out / RESUME, {CHECKPOINT: lambda p: shutil.copyfile(old, p),
                                           HISTORY_CSV: lambda p: Path(p).write_text(text)})
    if point is not None and old.is_file():
        old.unlink()
        if not (out / "tiny_clip.json").is_file():
            (out / HISTORY_CSV).unlink(missing_ok=True)  # the old layout's progress file
    return point


def load_checkpoint(path: Path, model: Pretrainer,
                    optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (step, history)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = PretrainConfig.from_dict(meta["config"])
    if saved != model.cfg:
        diff = {k: (v, getattr(model.cfg, k)) for k, v in saved.to_dict().items()
                if v != model.cfg.to_dict()[k]}
        raise ValueError(
            f"checkpoint {str(path)!r} was written by another config (saved vs asked: {diff}); "
            "pass another --out folder, or delete the run's resume folder to start over."
        )
    set_image_size(model, optimizer, meta["image_size"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in meta["optim_steps"].items():
        p = params[int(i)]
        optimizer.state[p] = {"step": torch.tensor(s),
                              "exp_avg": tensors[f"optim.{i}.exp_avg"].to(p.device),
                              "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"].to(p.device)}
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["history"]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_weights(clip: nn.Module, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Save the open_clip state dict (what backbone.load_weights reads); -> SHA-256.

    fp16 halves the file (~8.6 MB; positional embeddings stay fp32); ``load_state_dict``
    casts back to the model's dtype.
    """
    from safetensors.torch import save_file

    sd = {k: _cast(k, v.detach(), dtype) for k, v in clip.state_dict().items()}
    atomic_write(path, lambda p: save_file(sd, p))
    return sha256(path)


def _cast(name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Positional embeddings stay fp32: open_clip resizes them on load with a bicubic
    # interpolation that has no fp16 CPU kernel. load_state_dict casts the rest back.
    return (v.float() if "positional_embedding" in name else v.to(dtype)).contiguous()


def _history_text(history: list[dict]) -> str:
    lines = [",".join(HISTORY_FIELDS)]
    lines += [",".join(repr(h[k]) for k in HISTORY_FIELDS) for h in history]
    return "\n".join(lines) + "\n"


def write_history_csv(path: str | Path, history: list[dict]) -> None:
    atomic_write_text(path, _history_text(history))


def read_history_csv(path: str | Path) -> list[dict]:
    rows = Path(path).read_text().strip().splitlines()
    head = rows[0].split(",")
    return [{k: (int(v) if k in ("step", "size") else float(v))
             for k, v in zip(head, r.split(","), strict=True)} for r in rows[1:]]


# --- the loop -----------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, out: str | Path, stop_after: int | None = None,
             progress: bool | None = None, command: str | None = None, device: str = "cpu",
             workers: int = 0, machine: str | None = None) -> list[dict]:
    """Run (or resume) the pretraining in ``out``; returns the per-step history.

    Writes a resume point (:func:`save_point`, ``out/resume/<generation>/``) every
    ``cfg.checkpoint_every`` steps and at the end, and once ``cfg.steps`` are done the final
    outputs: ``out/history.csv``, ``out/tiny_clip.safetensors`` (the open_clip weights) and
    last ``out/tiny_clip.json`` (the record). ``stop_after`` ends the call
    after that many steps in all (same schedule: a stand-in for an interruption, and how the
    tests replay the first steps of the shipped run). ``progress``: None -> a bar on a tty.
    ``device``/``workers``: where the model runs and how many processes draw batches; neither
    changes the batches, but float results are exact only on one machine type and device.
    Runs in float32 whatever torch's default dtype is (tests/test_pretrain.py replays the
    record under a float64 default).
    """
    # float32 whatever the process default (pfl.setup() makes smoke processes float64): the
    # dtype the shipped record was made in, so its command reproduces it.
    with default_dtype(torch.float32):
        return _pretrain(cfg, Path(out), stop_after, progress, command, device, workers, machine)


def _pretrain(cfg: PretrainConfig, out: Path, stop_after: int | None, progress: bool | None,
              command: str | None, device: str, workers: int, machine: str | None) -> list[dict]:
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):
        # Full fp32 matmuls and convolutions, as on CPU.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if cfg.photo_share > 0:
        photo_set(cfg.photos)  # scan once here: a missing folder fails before any work
    if cfg.init_weights and not Path(cfg.init_weights).is_file():
        raise FileNotFoundError(f"init_weights {cfg.init_weights!r}: no such file; pass open_clip "
                                f"weights of {cfg.model_name}, e.g. the shipped {TINY_WEIGHTS}")
    model = Pretrainer(cfg).to(device)
    optimizer = make_optimizer(model)
    step, history = 0, []
    point = resume_point(out)
    if point is not None:
        step, history = load_checkpoint(point / CHECKPOINT, model, optimizer)
        log.info("resumed %s at step %d", point, step)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=end, initial=step, disable=not show, desc="pretrain")
    model.train()
    for batch in batch_stream(cfg, step, end, workers, model.patch):
        size, _ = cfg.phase(step)
        set_image_size(model, optimizer, size)
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts = model.losses(batch)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        history.append({
            "step": step, "loss": parts["loss"].item(), "global": parts["global"].item(),
            "dense": parts["dense"].item(), "lr": lr,
            "logit_scale": model.clip.logit_scale.item(),
            "dense_scale": model.dense_scale.item(), "size": size,
        })
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == end:
            save_point(out, model, optimizer, step, history)
    bar.close()
    if step == cfg.steps and not (out / "tiny_clip.json").is_file():
        write_history_csv(out / HISTORY_CSV, history)
        digest = export_weights(model.clip, out / "tiny_clip.safetensors")
        write_record(out / "tiny_clip.json", cfg, history, digest, command,
                     machine or f"{device}, {cfg.threads} torch threads")
    return history


def weights_from_checkpoint(ckpt: str | Path, path: str | Path,
                            dtype: torch.dtype = torch.float16) -> str:
    """Export the open_clip weights held in a checkpoint file, or in the newest point of a run
    folder (e.g. of an unfinished run); -> SHA-256."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if Path(ckpt).is_dir():
        point = latest_point(Path(ckpt) / RESUME)
        ckpt = point / CHECKPOINT if point is not None else Path(ckpt) / CHECKPOINT
    with safe_open(str(ckpt), framework="pt") as f:
        sd = {k[len("model.clip."):]: _cast(k, f.get_tensor(k), dtype)
              for k in f.keys() if k.startswith("model.clip.")}
    atomic_write(path, lambda p: save_file(sd, p))
    return sha256(path)


def command_line(cfg: PretrainConfig, out: str = "runs/tiny_clip") -> str:
    """The CLI command that runs ``cfg``: only fields that differ from the defaults appear."""
    args = ["python", "-m", "pfl", "pretrain", "--out", out]
    default = PretrainConfig()
    for f in dataclasses.fields(cfg):
        v, d = getattr(cfg, f.name), getattr(default, f.name)
        if v != d:
            flag = "--" + f.name.replace("_", "-")
            vals = v if isinstance(v, tuple) else (v,)
            args += [flag, *("none" if x is None else str(x) for x in vals)]
    return shlex.join(args)


def write_record(path: str | Path, cfg: PretrainConfig, history: list[dict], digest: str,
                 command: str | None = None, machine: str = "cpu") -> None:
    """The JSON record shipped beside the weights."""
    last = history[-50:]
    record = {
        "command": command or command_line(cfg),
        "config": cfg.to_dict(),
        "threads": cfg.threads,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "machine": machine,
        "data": {
            "domain": "pretrain: pfl.data.patterns procedural patterns only, drawn on the fly",
            "patterns": list(PATTERNS),
            "defects": f"pfl.data.defects.paint_defect, kinds {list(DEFECT_KINDS)}, area "
                       f"{list(cfg.defect_area)} of the image (evaluation: 0.002-0.05)",
            "batch": "pairs: one pattern image flawless and with a defect, same template and "
                     "noun, different state word",
            "stream": "batch of step t from numpy default_rng([seed, t])",
            "templates": list(TEMPLATES),
            "nouns": ["{pattern} pattern", "{pattern} texture", "{pattern}",
                      *GENERIC_NOUNS],
            "normal_states": list(NORMAL_STATES),
            "defect_states": {"generic": list(GENERIC_DEFECT_STATES), **KIND_STATES},
        },
        "photos": photo_record(photo_set(cfg.photos)) if cfg.photo_share > 0 else None,
        "init_weights_sha256": sha256(cfg.init_weights) if cfg.init_weights else None,
        "steps": len(history),
        "first_losses": [h["loss"] for h in history[:5]],
        "final_loss": history[-1]["loss"],
        "final_loss_mean_last_50": float(np.mean([h["loss"] for h in last])),
        "final_global_mean_last_50": float(np.mean([h["global"] for h in last])),
        "final_dense_mean_last_50": float(np.mean([h["dense"] for h in last])),
        "chance_global": math.log(2 * cfg.final_batch if cfg.final_size else 2 * cfg.batch),
        "weights": "tiny_clip.safetensors: open_clip state dict, float16 (positional "
                   "embeddings float32)",
        "sha256": digest,
        "history": "tiny_clip_history.csv",
    }
    atomic_write_json(path, record)
