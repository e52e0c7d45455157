"""The authors' code where it differs from the paper: loss forms, init, the second-stage head,
the test-set score constants, and the map from their checkpoint keys to ``pfl``'s parameters.

Every behaviour here is reached through a named option (:mod:`pfl.config`), all switched on
together by :func:`pfl.config.official`; the paper stays the default. ``docs/authors-code.md``
lists every difference with its measured size.

Nothing here imports :mod:`pfl.method.model` (the model calls into this module), so the pieces
are plain functions on tensors and small modules.

>>> import torch
>>> p = torch.full((1, 2, 2), 0.5); y = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
>>> round(float(official_dice(p, y)), 4)   # 1 - (2 * 0.5 + 1e-5) / (2 + 1 + 1e-5)
0.6667
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Checkpoint selection of the authors' training: five categories of the *target* dataset
# (target leakage; TrainConfig.selection="official_target").
SELECTION_CLASSES = {
    "mvtec": ("bottle", "hazelnut", "wood", "zipper", "leather"),
    "visa": ("chewinggum", "cashew", "pipe_fryum", "capsules", "candle"),
}
# Test-set image score: mean of the k largest raw-map values, k = 20 for these categories
# (small defects), else 2000 (EvalConfig.image_score="official").
TOPK_SMALL_CLASSES = ("capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew",
                      "chewinggum")
TOPK_SMALL, TOPK_LARGE = 20, 2000
# Datasets without pixel masks: the authors' score is the min-max normalised model score alone.
IMAGE_ONLY_DATASETS = ("headct", "brainmri", "br35h")
FUSION_WEIGHT = 0.5  # weight of the model's score against the map's top-k mean
MINMAX_EPS = 1e-8  # the authors add it to every min-max denominator
FOCAL_EPS = 1e-8  # inside the log and in the fg/bg denominators of the authors' focal loss
DICE_EPS = 1e-5  # numerator and denominator smoothing of the authors' dice loss
INIT_STD = 0.02  # the authors' std for every Linear weight


# --------------------------------------------------------------------------- losses


def official_focal(prob: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """The authors' focal loss: mean over mask pixels plus mean over background pixels.

    ``l_i = -(1 - p_i)^gamma log(p_i + 1e-8)`` with ``p_i`` the probability of the true class;
    ``sum(l * y) / (sum(y) + 1e-8) + sum(l * (1 - y)) / (sum(1 - y) + 1e-8)`` over the whole
    batch. The paper's Eq. A.3 is one mean over all pixels (:func:`pfl.method.losses.focal_loss`):
    this form weights the (few) defect pixels as much as the whole background.

    Args:
        prob: ``(N, H, W)`` abnormal probability.
        target: ``(N, H, W)`` mask in {0, 1}.
    """
    y = (target > 0.5).to(prob.dtype)
    p = torch.where(y > 0, prob, 1.0 - prob)
    loss = -(1.0 - p).pow(gamma) * torch.log(p + FOCAL_EPS)
    fg = (loss * y).sum() / (y.sum() + FOCAL_EPS)
    bg = (loss * (1.0 - y)).sum() / ((1.0 - y).sum() + FOCAL_EPS)
    return fg + bg


def official_dice(prob: Tensor, target: Tensor) -> Tensor:
    """The authors' dice loss: abnormal map only, pooled over the whole batch, eps 1e-5.

    ``1 - (2 sum(p y) + 1e-5) / (sum(p) + sum(y) + 1e-5)`` with every sum over all images and
    pixels (the paper's Eq. A.4 per image, :func:`pfl.method.losses.dice_loss`, averages one
    ratio per image).
    """
    y = target.to(prob.dtype)
    return 1.0 - (2.0 * (prob * y).sum() + DICE_EPS) / (prob.sum() + y.sum() + DICE_EPS)


def official_orthogonality(banks: Tensor) -> Tensor:
    """The authors' L_ort: per state, the mean over (images, B, B) of the squared cosines with
    the diagonal set to 0; normal plus abnormal.

    Args:
        banks: ``(G, B, E)`` text features, G = 2 x images: half normal banks, half abnormal
            ones (any order). The result is ``2 * mean_g(sum_{i != j} cos_ij^2) / B^2``, the
            sum over the two states of their means over images. The paper's form
            (:func:`pfl.method.losses.orthogonal_loss`) divides by ``B (B - 1)`` and averages
            the states instead: this one is ``2 (B - 1) / B`` times it.
    """
    if banks.dim() != 3 or banks.shape[0] % 2:
        raise ValueError(f"official_orthogonality: banks must be (2 x images, B, E), got "
                         f"{tuple(banks.shape)}")
    f = F.normalize(banks, dim=-1)
    cos = f @ f.transpose(1, 2)
    off = cos - torch.diag_embed(torch.diagonal(cos, dim1=1, dim2=2))
    b = banks.shape[1]
    return 2.0 * (off * off).sum((1, 2)).mean() / (b * b)


# --------------------------------------------------------------------------- second stage


class GlobalFeature(nn.Module):
    """The authors' ``Global_Feature`` (second stage): attention pooling of the patch tokens.

    ``h = Linear(L W_v -> hidden)`` on the L tapped layers' raw patch tokens concatenated per
    token; ``a = softmax_T(Linear(hidden -> 1)(h))``; ``out = Linear(hidden -> E)(sum_T a h)``.
    ViT-L-14: ``4096 -> 512 -> 768``; ``hidden = W_v / 2``.
    """

    def __init__(self, n_layers: int, width: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width // 2
        self.fuse_modules = nn.Linear(n_layers * width, hidden)
        self.compress = nn.Linear(hidden, 1)
        self.post_process = nn.Linear(hidden, out_dim)

    def forward(self, patches: Tensor) -> Tensor:
        """``patches (N, L, T, W_v) -> (N, E)``."""
        n, n_layers, t, w = patches.shape
        x = patches.permute(0, 2, 1, 3).reshape(n, t, n_layers * w)
        h = self.fuse_modules(x)  # (N, T, hidden)
        a = self.compress(h).softmax(dim=1)  # (N, T, 1)
        return self.post_process((a * h).sum(1))


class SecondStageHead(nn.Module):
    """The image feature of the authors' second stage: ``image_mapping(g + fuse(patches))``.

    The image logits then use ``normalize(head(g, patches))`` in place of ``normalize(g)``
    (``ModelConfig.second_stage``); trained after the first stage on the CE loss only, with
    ``phi`` (the authors' ``class_mapping``).
    """

    def __init__(self, n_layers: int, width: int, dim: int):
        super().__init__()
        self.fuse = GlobalFeature(n_layers, width, dim)
        self.image_mapping = nn.Linear(dim, dim)

    def forward(self, global_: Tensor, patches: Tensor) -> Tensor:
        """``g (N, E)``, ``patches (N, L, T, W_v)`` -> ``(N, E)``, not normalised."""
        return self.image_mapping(global_ + self.fuse(patches))


# --------------------------------------------------------------------------- init


def _normal_linear(module: nn.Module, generator: torch.Generator) -> None:
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=INIT_STD, generator=generator)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def _torch_default_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    # torch's Linear/Conv1d default: kaiming-uniform(a = sqrt 5) weight, U(+-1/sqrt(fan_in)) bias;
    # a 1x1 Conv1d(E, E) and a Linear(E, E) have the same fan-in.
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.weight.shape[1])
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def official_init(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise a :class:`pfl.method.model.BayesPFL`'s new modules as the authors' code does
    (``ModelConfig.init="official"``).

    Every Linear (f_mu / f_sigma, the ISD u/w/b heads, phi, the per-layer projections, the
    second-stage head) ``N(0, 0.02^2)`` with zero bias, so ``s = 0`` and the initial q0 std is
    ``exp(0 / 4) = 1``; the IAD planar parameters ``u, w, b`` and the IAD state vectors
    ``N(0, 1)``; the RCA query keeps torch's default (Conv1d) init. The prompt banks and
    temperatures keep their init (the same in both). pfl's default init instead starts every
    flow at the identity with q0 std 0.02 (:class:`pfl.method.flows.PromptFlow`).
    """
    with torch.no_grad():
        for name in ("isd", "iad_encoder", "phi", "global_head"):
            sub = getattr(model, name, None)
            if sub is not None:
                _normal_linear(sub, generator)
        nn.init.normal_(model.proj.weight, std=INIT_STD, generator=generator)
        for flow in (model.iad_normal, model.iad_abnormal):
            for p in (getattr(flow, "u", None), getattr(flow, "w", None),
                      getattr(flow, "b", None)):
                if p is not None:
                    nn.init.normal_(p, generator=generator)
        nn.init.normal_(model.iad_state, generator=generator)
        _torch_default_linear(model.rca.query, generator)


# --------------------------------------------------------------------------- checkpoint keys


def _mlp_keys(theirs: str, ours: str) -> dict[str, str]:
    out = {}
    for net, mine in (("weight_mean", "f_mu"), ("weight_log_variance", "f_sigma")):
        for i in (0, 2, 4):
            for kind in ("weight", "bias"):
                out[f"{theirs}.{net}.module.{i}.{kind}"] = f"{ours}.{mine}.{i}.{kind}"
    return out


def key_map(n_layers: int = 4, second_stage: bool = True) -> dict[str, str]:
    """The authors' ``state_dict`` key -> ``pfl`` trainable key, for every tensor their forward
    pass uses (the reshapes are in :func:`convert_state_dict`).

    The authors' modules share sub-modules, so their ``state_dict`` repeats some tensors under
    other names (:data:`ALIASES`); the first name is the one mapped here.
    """
    m = {
        "prompt_context": "bank.context",
        "prompt_state_normal": "bank.normal",
        "prompt_state_abnormal": "bank.abnormal",
        "temperature_pixel": "tau_pix",
        "temperature_image": "tau_img",
        "PFL_normal.state": "iad_state[0]",
        "PFL_abnormal.state": "iad_state[1]",
        "RCA.q_proj_pre.weight": "rca.query.weight",
        "RCA.q_proj_pre.bias": "rca.query.bias",
        "class_mapping.weight": "phi.weight",
        "class_mapping.bias": "phi.bias",
    }
    m |= _mlp_keys("context_encoder", "isd.encoder")
    m |= _mlp_keys("state_encoder", "iad_encoder")
    for head in ("u", "w", "b"):
        for kind in ("weight", "bias"):
            m[f"PFL_context.amor_{head}.{kind}"] = f"isd.{head}_head.{kind}"
        for s in ("normal", "abnormal"):
            m[f"PFL_{s}.amor_{head}"] = f"iad_{s}.{head}"
    for i in range(n_layers):
        m[f"RCA.linear_proj.{i}.weight"] = f"proj.weight[{i}]"
    if second_stage:
        for kind in ("weight", "bias"):
            m[f"image_mapping.{kind}"] = f"global_head.image_mapping.{kind}"
            for part in ("fuse_modules", "compress", "post_process"):
                m[f"fuse.{part}.{kind}"] = f"global_head.fuse.{part}.{kind}"
    return m


# Their names for tensors already mapped under another name (shared sub-modules).
ALIASES = {"PFL_context.encoder.": "context_encoder.", "PFL_normal.encoder.": "state_encoder.",
           "PFL_abnormal.encoder.": "state_encoder."}
# Their tensors no forward pass reads (the reconstruction path, whose loss train.py never adds).
UNUSED_PREFIXES = ("context_decoder.", "state_decoder.", "PFL_context.decoder.",
                   "PFL_normal.decoder.", "PFL_abnormal.decoder.", "PFL_context.p_mu.",
                   "PFL_normal.p_mu.", "PFL_abnormal.p_mu.")


def check_keys(theirs: dict[str, Tensor], source: str = "checkpoint"
               ) -> tuple[dict[str, str], list[str]]:
    """The key map for the authors' state dict ``theirs`` and their keys left out.

    Raises a ValueError naming every missing key, unknown key and alias that differs from its
    first name; needs no model (the import checks the file before building one).
    """
    n_layers = sum(1 for k in theirs if k.startswith("RCA.linear_proj."))
    second = any(k.startswith(("fuse.", "image_mapping.")) for k in theirs)
    mapping = key_map(n_layers, second_stage=second)
    missing = sorted(set(mapping) - set(theirs))
    dropped, unknown, bad_alias = [], [], []
    for k in theirs:
        if k in mapping:
            continue
        alias = next((a for a in ALIASES if k.startswith(a)), None)
        if alias is not None:
            first = ALIASES[alias] + k[len(alias):]
            if first not in theirs or not torch.equal(theirs[k], theirs[first]):
                bad_alias.append(k)
            dropped.append(k)
        elif k.startswith(UNUSED_PREFIXES):
            dropped.append(k)
        else:
            unknown.append(k)
    if missing or unknown or bad_alias:
        raise ValueError(
            f"{source} does not hold the authors' Bayes-PFL parameters as expected: "
            f"missing keys {missing}, unknown keys {sorted(unknown)}, aliases that differ "
            f"from their first name {sorted(bad_alias)}. Pass the .pth that their train.py "
            "writes ({'MyModel': state_dict}) for the ViT-L-14-336 model."
        )
    return mapping, sorted(dropped)


def convert_state_dict(theirs: dict[str, Tensor], ours: dict[str, Tensor],
                       source: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """The authors' state dict -> a full ``pfl`` trainable state dict (shapes of ``ours``).

    Args:
        theirs: the authors' ``MyModel`` state dict.
        ours: a ``BayesPFL.trainable_state_dict()`` of the target configuration (its keys and
            shapes; values are replaced).
        source: the file name for error messages.

    Returns:
        ``(state, dropped)``: the state to load and the authors' keys left out (unused
        reconstruction path, and aliases equal to their first name).

    Raises:
        ValueError: naming every missing key, unknown key, alias that differs from its first
            name, or shape that does not fit.
    """
    mapping, dropped = check_keys(theirs, source)
    second = any(v.startswith("global_head.") for v in mapping.values())
    if second != any(k.startswith("global_head.") for k in ours):
        raise ValueError(f"{source}: the checkpoint {'has' if second else 'lacks'} the "
                         "second-stage head (fuse, image_mapping) but the configuration "
                         f"{'lacks' if second else 'has'} it: set ModelConfig.second_stage="
                         f"{second}")
    out = {k: v.detach().clone() for k, v in ours.items()}
    filled: set[str] = set()
    for their_key, our_key in mapping.items():
        value = theirs[their_key].detach()
        name, index = our_key, None
        if our_key.endswith("]"):
            name, index = our_key[:-1].split("[")
            index = int(index)
        target = out[name] if index is None else out[name][index]
        if value.numel() != target.numel():
            raise ValueError(f"{source}: {their_key} has shape {tuple(value.shape)}, pfl's "
                             f"{our_key} needs {tuple(target.shape)} (check ModelConfig: B, P, "
                             "Q, K and the backbone)")
        target.copy_(value.reshape(target.shape))  # copy_ casts to pfl's dtype
        filled.add(name)
    # Shared modules appear under every name in pfl's state dict too: fill the aliases.
    for k in out:
        for alias in ("iad_normal.encoder.", "iad_abnormal.encoder."):
            if k.startswith(alias):
                out[k] = out["iad_encoder." + k[len(alias):]].clone()
                filled.add(k)
    left = sorted(k for k in out if k not in filled and k != "image_stage")
    if left:
        raise ValueError(f"{source}: nothing in the checkpoint fills pfl's {left}")
    return out, sorted(dropped)
