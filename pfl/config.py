"""Typed configuration: one dataclass per part, and the ``smoke`` and ``paper`` profiles.

The two profiles share every code path; only sizes and sources differ (docs/reproduction.md,
"Backbone" and appendix A.1). The active profile comes from the ``PFL_PROFILE`` environment
variable (``smoke`` by default) or is passed explicitly::

    >>> from pfl import config
    >>> config.smoke().backbone.model_name
    'pfl-tiny'
    >>> config.paper().backbone.image_size
    518
    >>> config.paper().model.flow_length   # K
    10
    >>> config.official().name, config.official(config.smoke()).backbone.model_name
    ('paper-official', 'pfl-tiny')
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILES = ("smoke", "paper", "official")


@dataclass
class BackboneConfig:
    """The frozen CLIP (docs/reproduction.md, "Backbone")."""

    model_name: str = "pfl-tiny"  # open_clip config name; "pfl-tiny" ships inside pfl/clip/assets
    image_size: int = 224  # input side; positional embeddings are resized to it
    layers: tuple[int, ...] | None = None  # 1-based blocks to tap; None: 4 evenly spaced
    weights: str | None = None  # local file, or a shipped tower ("tiny-v1"); None: "tiny-v2"
    init_seed: int = 0  # seed of the random init when no weights are used
    precision: str = "fp32"  # towers' dtype: "fp64", "fp32", open_clip's "fp16"/"bf16"


@dataclass
class ModelConfig:
    """Bayes-PFL's new modules (docs/reproduction.md, "Prompts", "Prompt flow", "RCA")."""

    n_prompts: int = 3  # B: prompts per bank
    n_ctx: int = 5  # P: learnable context vectors per prompt
    n_state: int = 5  # Q: learnable state vectors per prompt
    flow_length: int = 10  # K: planar steps per flow
    flow_type: str = "planar"  # "planar" (paper) | "gaussian" (appendix Eq. A.5 ablation)
    invertible: bool = False  # True: u-hat reparameterisation so that w^T u > -1
    mlp_hidden: int | None = None  # width of f_mu/f_sigma; None: joint width C (paper)
    # True: the authors' f_mu/f_sigma width (vision width / 2), q0 std exp(s / 4) and bilinear
    # upsampling with align_corners=True (see pfl.method.model's docstring)
    official_compat: bool = False
    mc_train: int = 1  # R during training
    mc_test: int = 10  # R at inference
    rca_heads: int = 4  # heads of the RCA attention
    share_iad_samples: bool = False  # authors' inference: one IAD draw for all images of a run
    class_aware: bool = True  # put the class words in the template
    init: str = "pfl"  # "pfl" (flows start at identity, q0 std 0.02) | "official" (authors')
    iad_logdet_per_batch: bool = False  # True: authors' IAD flow loss, sum log|det| / batch N
    second_stage: bool = False  # True: authors' Global_Feature head for the image logits
    # What the ISD reads: "unit" (pfl default) the global feature scaled to unit L2 norm;
    # "raw" (the authors' code) the feature as the tower gives it. The paper does not say.
    # With "raw", each Adam step moves the amortised flow's u, w, b by lr x ||xi||_1 (~90 on
    # the tiny tower), which makes training chaotic (benchmarks/sensitivity.py).
    isd_condition: str = "unit"
    # Prior of the flow loss N(0, prior_std^2 I) (appendix Eq. A.1 / A.5); paper: N(0, I). The
    # samples perturb token embeddings of std ~0.02; under N(0, I) the flow loss pulls the shared
    # ISD sample ~40x past that scale and the B prompts of a bank coincide (README "Measured",
    # the prompt posterior; notebook 05). The smoke profile uses 0.02, the token scale; the
    # paper profile keeps 1.
    prior_std: float = 1.0


@dataclass
class TrainConfig:
    """Auxiliary training (appendix A.1; the authors' code differs, docs/authors-code.md)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4  # paper: Adam lr 1e-4 for everything
    optimizer: str = "paper"  # "paper" | "official" (per-group lrs, betas (0.5, 0.999), cosine)
    flow_weight: float = 0.01  # weight of each flow's loss
    ort_weight: float = 1.0  # weight of L_ort
    focal_gamma: float = 2.0
    # "paper" (Eq. A.3 / A.4 / mean off-diagonal cos^2) | "official" (the authors' code:
    # focal = fg mean + bg mean; dice abnormal map only, pooled over the batch, eps 1e-5;
    # L_ort = off-diagonal sum / (N B^2), normal + abnormal summed): pfl.method.official
    loss_form: str = "paper"
    patience: int | None = None  # stop after this many epochs without a better selection value
    second_stage_epochs: int = 0  # epochs of the authors' CE-only second stage (second_stage)
    selection: str = "last"  # "last" | "holdout" (aux categories held out) | "official_target"
    holdout_classes: int = 0  # aux categories held out for selection ("holdout")
    selection_metric: str = "pixel_ap"  # mean metric that "holdout"/"official_target" maximise
    seed: int = 0
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # cap (smoke) on steps per epoch


@dataclass
class EvalConfig:
    """Zero-shot evaluation (docs/reproduction.md, "Maps, scores and losses", "Metrics")."""

    mc_samples: int | None = None  # R at inference; None: the method's own (ModelConfig.mc_test)
    sigma: float = 8.0  # Gaussian blur of the maps, in pixels at 518 px; scaled to image size
    # "per_image" | "official_minmax" (transductive, per class, smoothed map, scaled top-k)
    # | "official" (the authors' recipe exactly: raw map, per-class k, image-only datasets)
    image_score: str = "per_image"
    topk: int = 2000  # top-k map values for "official_minmax", at 518 px; scaled by area
    aupro: str = "exact"  # "exact" | "common" (200 thresholds, rescaled FPR)
    batch_size: int = 8
    seed: int = 0
    # per image, the mean and max of the per-pixel std over the R samples (std_mean, std_max
    # in samples/<dataset>.csv; unsmoothed); only for methods that sample (Bayes-PFL)
    uncertainty: bool = False


@dataclass
class DataConfig:
    """Where the data come from (docs/reproduction.md, "Data layout")."""

    root: str = "data/synthetic"  # data root holding meta.json files
    aux: str = "aux"  # auxiliary training dataset
    targets: tuple[str, ...] = ("target",)  # zero-shot target datasets
    synthetic: bool = True  # build the offline benchmark when root is missing
    aux_split: str = "test"  # split of the aux dataset to train on (the authors: VisA's test)
    feature_cache: str = "auto"  # frozen-tower features: "auto" | "disk" | "memory" | "none"
    synth_images: int = 40  # synthetic benchmark: normal and anomalous images per class and split


@dataclass
class NumericsConfig:
    """Process-wide numerical settings that stored results depend on (applied by
    :func:`pfl.runtime.setup`).

    Note: float32 results differ in their last bits between CPUs (AVX-512, AVX2 and plain
    kernels sum in different orders), and training amplifies those bits into different
    numbers. In float64 the same differences start 1e9 times smaller, so what a notebook prints
    at 3-4 digits comes out the same on any x86-64 CPU. The smoke profile's models are small
    enough to afford it; the paper profile stays in float32 (GPU).
    """

    dtype: str = "float32"  # torch default dtype for every tensor and module pfl creates
    threads: int | None = None  # intra-op CPU threads (torch and BLAS); None: leave as is


@dataclass
class Profile:
    """Everything one run needs; ``smoke()`` and ``paper()`` fill it."""

    name: str
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields {sorted(unknown)}")
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return klass(**kw)

        return cls(
            name=d["name"],
            backbone=build(BackboneConfig, d.get("backbone", {})),
            model=build(ModelConfig, d.get("model", {})),
            train=build(TrainConfig, d.get("train", {})),
            eval=build(EvalConfig, d.get("eval", {})),
            data=build(DataConfig, d.get("data", {})),
            numerics=build(NumericsConfig, d.get("numerics", {})),
        )

    def replace(self, **sections) -> Profile:
        """Copy with fields of sections changed: ``p.replace(model={"n_prompts": 1})``."""
        out = dataclasses.replace(self)
        for sec, changes in sections.items():
            setattr(out, sec, dataclasses.replace(getattr(self, sec), **changes))
        return out


def smoke() -> Profile:
    """The CPU profile: the tiny tower, the synthetic benchmark, small training."""
    return Profile(
        name="smoke",
        backbone=BackboneConfig(model_name="pfl-tiny", image_size=224, precision="fp64"),
        # The prior at the token scale: a posterior whose B prompts differ (ModelConfig.prior_std)
        model=ModelConfig(prior_std=0.02),
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-3, max_steps_per_epoch=None),
        eval=EvalConfig(batch_size=16),
        data=DataConfig(root="data/synthetic", aux="aux", targets=("target", "medical")),
        numerics=NumericsConfig(dtype="float64", threads=1),
    )


def paper() -> Profile:
    """The paper's setting: ViT-L-14-336 at 518 px, VisA -> MVTec-AD (appendix A.1)."""
    return Profile(
        name="paper",
        backbone=BackboneConfig(
            model_name="ViT-L-14-336",
            image_size=518,
            layers=(6, 12, 18, 24),
            weights=os.environ.get("PFL_CLIP_WEIGHTS"),
        ),
        model=ModelConfig(),
        train=TrainConfig(epochs=20, batch_size=32, lr=1e-4),
        eval=EvalConfig(batch_size=8),
        data=DataConfig(
            root=os.environ.get("PFL_DATA_ROOT", "data"),
            aux="visa",
            targets=("mvtec",),
            synthetic=False,
        ),
    )


def official(base: Profile | None = None) -> Profile:
    """Every behaviour of the authors' code switched on, on ``base`` (default ``paper()``).

    docs/authors-code.md lists each option, what it reproduces and its measured size. The
    checkpoint selection reads target categories (target leakage) and the image score is
    transductive: use this preset to compare with published numbers or to run the authors'
    released checkpoint (``python -m pfl import-official``), not as a zero-shot protocol.
    The flow loss's prior is the paper's and the code's N(0, I) whatever ``base`` uses.
    """
    base = base or paper()
    out = base.replace(
        model={"official_compat": True, "share_iad_samples": True, "init": "official",
               "iad_logdet_per_batch": True, "second_stage": True,
               "isd_condition": "raw", "prior_std": 1.0},
        train={"optimizer": "official", "loss_form": "official", "selection": "official_target",
               "selection_metric": "pixel_ap", "patience": 3, "second_stage_epochs": 1},
        eval={"image_score": "official"},
        data={"aux_split": "test"},
    )
    out.name = base.name if base.name.endswith("official") else f"{base.name}-official"
    return out


def active(name: str | None = None) -> Profile:
    """The profile named ``name``, else ``$PFL_PROFILE``, else ``smoke``."""
    name = name or os.environ.get("PFL_PROFILE", "smoke")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: set PFL_PROFILE to one of {PROFILES}")
    return {"smoke": smoke, "paper": paper, "official": official}[name]()


def repo_root() -> Path:
    """The checkout's top folder (figures/, data/ and runs/ live there)."""
    return Path(__file__).resolve().parent.parent


def figures_dir() -> Path:
    """Where notebooks write their figures: ``$PFL_FIGURES_DIR`` if set, else ``figures/``.

    The tests set ``PFL_FIGURES_DIR`` to a temporary folder, so re-executing the notebooks
    under ``pytest --nbval`` never rewrites tracked files; only ``make figures`` (which leaves
    it unset) writes ``figures/``.
    """
    env = os.environ.get("PFL_FIGURES_DIR")
    out = Path(env) if env else repo_root() / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return out
