"""Bayes-PFL: frozen CLIP + prompt banks + prompt flows + RCA -> anomaly maps and scores.

docs/reproduction.md, "Prompts", "Prompt flow", "RCA", "Maps, scores and losses";
appendix A.1 and Algorithm 1. For a batch of N images and R Monte Carlo samples:

1. The frozen image tower gives the global feature ``g (N, E)`` and the residual stream of L
   tapped blocks ``(N, L, T, W_v)``; per layer ``F_s = normalize(W_l P_l)``, ``W_l`` a
   bias-free ``Linear(W_v -> E)``.
2. The ISD flow, conditioned on ``g``, draws R context offsets per image; the two IAD flows
   (normal, abnormal: free state vectors, one shared encoder, free planar parameters) draw R
   state offsets. Each offset is added to all P context (Q state) tokens of every prompt of
   the bank (:class:`pfl.method.prompts.PromptBank`).
3. All ``N x B x R x 2`` prompts are encoded by the frozen text tower in one call; the normal
   and abnormal prompt of an (image, bank, sample) share [SOS] and the P context tokens, so
   that prefix runs once (:meth:`pfl.clip.backbone.Backbone.encode_text_shared_prefix`, exact).
4. RCA refines the text features with the patches of each layer; pixel logits are
   ``exp(tau_pix) F_s F_t'^T``; the abnormal probability of a (normal, abnormal) pair is
   ``sigmoid(up(abnormal - normal))``: only the difference is upsampled (exact: bilinear
   upsampling is linear).
5. The anomaly map is the mean over layers and the ``B x R`` pairs of that probability
   (:func:`pfl.method.maps.fused_maps`: no pair's full-resolution map is stored); the
   global score the mean over pairs of ``softmax(exp(tau_img) <phi(t), g>)[abnormal]``.
   Optionally ``map_std``: the per-pixel spread of the R per-sample maps.

Training (``model.train()``) draws ``R = mc_train`` samples and one bank index ``b`` for the
whole batch; every bank prompt is still encoded so that L_ort sees the whole bank (as in the
authors' code); maps and global logits use bank ``b`` only. Inference uses all B banks and
``R = mc_test``.

Randomness (:mod:`pfl.method.sampling`): every image draws its noise from its own stream,
seeded at inference by the run's seed and a hash of the image's pixels, so an image's map and
score depend only on the image, the checkpoint and the seed: not on the batch size, the order
or the other images. The authors' code pairs each image with the ISD samples of every image
of the batch when the batch has more than one image; ``pfl`` does not reproduce that.

``official_compat=True`` switches to the authors' code where it differs from the paper:
``f_mu``/``f_sigma`` hidden width ``vision_width // 2`` (paper: the joint width C),
``sigma = exp(s / 4)`` in the flows (:class:`pfl.method.flows.GaussianEncoder`), bilinear
upsampling with ``align_corners=True``. The other behaviours of the authors' code are named
options of their own (``init``, ``iad_logdet_per_batch``, ``second_stage``; the loss forms in
``TrainConfig.loss_form``), implemented in :mod:`pfl.method.official` and switched on together by
:func:`pfl.config.official`. ``share_iad_samples=True`` (or ``share_iad=True`` per
call) is the authors' inference: one IAD draw for every image of the run (the run seed's own
stream); in training one per step.

Init: every submodule draws from its own generator, seeded by ``(seed, module name)``
(:func:`pfl.utils.derive_seed`), so changing one module (e.g. ``flow_type``) leaves every
other tensor as it was.

>>> import torch
>>> from pfl.clip.backbone import Backbone
>>> from pfl.config import BackboneConfig, ModelConfig
>>> bb = Backbone.from_config(BackboneConfig(image_size=56))
>>> model = BayesPFL(bb, ModelConfig(mc_test=2)).eval()
>>> with torch.no_grad():
...     out = model(torch.zeros(1, 3, 56, 56), ["bottle"], seeds=[0])
>>> tuple(out.anomaly_map.shape), tuple(out.pixel_logits.shape), tuple(out.score.shape)
((1, 56, 56), (1, 4, 6, 4, 4), (1,))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.config import ModelConfig, TrainConfig
from pfl.method.contract import Batch, Prediction, Shard, StepLoss
from pfl.method.flows import GaussianEncoder, PromptFlow
from pfl.method.losses import LossTerms, bayes_pfl_loss
from pfl.method.maps import compiled_maps, fused_maps
from pfl.method.official import SecondStageHead, official_init
from pfl.method.prompts import PromptBank, PromptTemplates
from pfl.method.rca import RCA, LayerProjections
from pfl.method.sampling import PromptNoise, draw_seeds, prompt_noise
from pfl.utils import generator_for

TAU_INIT = math.log(1 / 0.07)  # docs/reproduction.md, "Maps, scores and losses"


@dataclass
class BayesPFLOutput:
    """What :class:`BayesPFL` gives for a batch of N images (M = B' x R prompt pairs).

    The pairs are ordered bank-major: pair ``m = b' * R + r``.

    Attributes:
        anomaly_map: ``(N, S, S)`` abnormal probability, mean over layers and pairs.
        layer_maps: ``(N, L, S, S)`` abnormal probability per layer, mean over pairs.
        pixel_logits: ``(N, L, M, gh, gw)`` abnormal minus normal pixel logit per layer and
            pair at patch resolution (``sigmoid`` of its upsampling is the pair's
            probability).
        global_logits: ``(N, M, 2)`` (normal, abnormal) logits for the CE loss.
        score: ``(N,)`` global score, mean over pairs of the abnormal softmax probability.
        text_features: ``(N, B, R, 2, E)`` normalised text features of every bank prompt
            (before RCA; index 0 normal, 1 abnormal), for L_ort.
        flow_losses: ``{"isd": (N,), "normal": (N or 1,), "abnormal": (N or 1,)}`` flow losses.
        banks: ``(B',)`` the bank indices the pairs use (one in training).
        n_samples: R.
        map_std: ``(N, S, S)`` per-pixel standard deviation over the R samples of the
            per-sample map (:func:`pfl.method.maps.fused_maps`), when asked for, else None.
        sample_maps: ``(N, R, S, S)`` the R per-sample maps (mean over layers and bank
            prompts), when asked for, else None; their mean over R is ``anomaly_map``.
    """

    anomaly_map: Tensor
    layer_maps: Tensor
    pixel_logits: Tensor
    global_logits: Tensor
    score: Tensor
    text_features: Tensor
    flow_losses: dict[str, Tensor]
    banks: Tensor
    n_samples: int
    map_std: Tensor | None = None
    sample_maps: Tensor | None = None


def _init_linear(module: nn.Module, generator: torch.Generator) -> None:
    # The paper gives no init; the authors' code draws Linear weights N(0, 0.02^2), zero bias.
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02, generator=generator)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class BayesPFL(nn.Module):
    """The Bayes-PFL model on a frozen :class:`pfl.clip.backbone.Backbone` (see module docstring).

    It meets :class:`pfl.method.contract.Method` (``training_step``, ``predict``), so
    :func:`pfl.run.train.fit` and :mod:`pfl.run.evaluate` run it like the peers.

    Args:
        backbone: the frozen CLIP (its parameters never train).
        cfg: sizes and switches (B, P, Q, K, R, flow type, ``official_compat``, ...).
        seed: seed of every random init of the new modules (the global RNG is untouched).
        train_cfg: loss weights for :meth:`training_step` (default ``TrainConfig()``).

    Attributes (the new modules): ``proj`` (per-layer projections), ``bank``
    (``PromptBank``), ``isd`` (amortised :class:`pfl.method.flows.PromptFlow`),
    ``iad_normal`` / ``iad_abnormal`` (free flows sharing ``iad_encoder``), ``iad_state``
    (``(2, E)`` free conditioning vectors), ``rca``, ``phi``, ``tau_pix``, ``tau_img``.
    """

    name = "Bayes-PFL"
    takes_n_samples = True  # predict(..., n_samples=R): pfl.run.evaluate passes EvalConfig's R

    def __init__(self, backbone: Backbone, cfg: ModelConfig | None = None, seed: int = 0,
                 train_cfg: TrainConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.backbone = cfg, backbone
        self.train_cfg = train_cfg or TrainConfig()
        E, W, D = backbone.embed_dim, backbone.vision_width, backbone.text_width
        # Paper: hidden width C of f_mu/f_sigma; the authors' code: vision width / 2.
        hidden = cfg.mlp_hidden or (W // 2 if cfg.official_compat else E)

        def gen(name: str) -> torch.Generator:  # one stream per module (module docstring)
            return generator_for(seed, "BayesPFL", name)

        flow_kw = dict(n_steps=cfg.flow_length, flow_type=cfg.flow_type,
                       invertible=cfg.invertible, official_compat=cfg.official_compat,
                       prior_std=cfg.prior_std)
        # Building an nn.Linear draws torch's default init from the global RNG before the
        # module's own generator overwrites it: keep the caller's stream untouched.
        with torch.random.fork_rng(devices=[]):
            self.proj = LayerProjections(len(backbone.layers), W, E)
            self.bank = PromptBank(cfg.n_prompts, cfg.n_ctx, cfg.n_state, D,
                                   generator=gen("bank"))
            isd_encoder = GaussianEncoder(E, D, hidden, cfg.official_compat,
                                          generator=gen("isd.encoder"))
            self.isd = PromptFlow(D, E, amortised=True, encoder=isd_encoder,
                                  generator=gen("isd"), **flow_kw)
            self.iad_encoder = GaussianEncoder(E, D, hidden, cfg.official_compat,
                                               generator=gen("iad_encoder"))
            self.iad_normal = PromptFlow(D, E, amortised=False, encoder=self.iad_encoder,
                                         generator=gen("iad_normal"), **flow_kw)
            self.iad_abnormal = PromptFlow(D, E, amortised=False, encoder=self.iad_encoder,
                                           generator=gen("iad_abnormal"), **flow_kw)
            # Free IAD conditioning vectors (normal, abnormal); N(0, 1) as in the code.
            self.iad_state = nn.Parameter(torch.randn(2, E, generator=gen("iad_state")))
            self.rca = RCA(E, cfg.rca_heads)
            self.phi = nn.Linear(E, E)
        nn.init.normal_(self.proj.weight, std=0.02, generator=gen("proj"))
        _init_linear(self.rca, gen("rca"))
        _init_linear(self.phi, gen("phi"))
        self.tau_pix = nn.Parameter(torch.tensor(TAU_INIT))
        self.tau_img = nn.Parameter(torch.tensor(TAU_INIT))
        self.templates = PromptTemplates(backbone.tokenize, cfg.n_ctx, cfg.n_state,
                                         cfg.class_aware)
        # The authors' second stage (pfl.method.official.SecondStageHead): image logits from
        # image_mapping(g + fuse(patches)) once ``image_stage`` is 2 (kept in the checkpoint).
        self.global_head = None
        if cfg.second_stage:
            self.global_head = SecondStageHead(len(backbone.layers), W, E)
            self.register_buffer("image_stage", torch.tensor(1))
        if cfg.init == "official":
            official_init(self, gen("official_init"))
        elif cfg.init != "pfl":
            raise ValueError(f"ModelConfig.init must be 'pfl' or 'official', got {cfg.init!r}")

    # --- bookkeeping -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new modules only (CLIP stays frozen)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by the authors' learning-rate groups (docs/authors-code.md).

        ``prompts`` (the bank), ``temperatures``, ``flows`` (planar parameters and heads, the
        IAD state vectors), ``rest`` (q0 encoders, projections, RCA, phi).
        """
        groups: dict[str, list[nn.Parameter]] = {"prompts": [], "temperatures": [],
                                                 "flows": [], "rest": []}
        for name, p in self.named_parameters():
            if name.startswith("backbone."):
                continue
            if name.startswith("bank."):
                groups["prompts"].append(p)
            elif name.startswith("tau_"):
                groups["temperatures"].append(p)
            elif name == "iad_state" or (name.startswith(("isd.", "iad_normal.", "iad_abnormal."))
                                         and ".encoder." not in name):
                groups["flows"].append(p)
            else:
                groups["rest"].append(p)
        return groups

    def _aliases(self) -> dict[str, str]:
        """State-dict names that repeat a tensor already listed under an earlier name -> that
        name (the IAD flows' ``encoder.*`` are ``iad_encoder.*``)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, t in self.state_dict(keep_vars=True).items():
            if name.startswith("backbone."):
                continue
            if id(t) in first:
                aliases[name] = first[id(t)]
            else:
                first[id(t)] = name
        return aliases

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state of the new modules only, each tensor once (CLIP is loaded apart)."""
        aliases = self._aliases()
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items()
                if not k.startswith("backbone.") and k not in aliases}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; the key sets must match exactly.

        A checkpoint in the older layout, which repeated the shared IAD encoder under
        ``iad_normal.encoder.*`` and ``iad_abnormal.encoder.*``, loads too (the copies must
        equal ``iad_encoder.*``).
        """
        state = dict(state)
        for alias, name in self._aliases().items():
            if alias not in state:
                continue
            copy = state.pop(alias)
            if name not in state:
                state[name] = copy
            elif not torch.equal(copy, state[name]):
                raise ValueError(f"checkpoint holds {alias!r} and {name!r}, which this model "
                                 "shares, with different values: it was not saved by BayesPFL")
        want = set(self.trainable_state_dict())
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit this BayesPFL (check its ModelConfig and backbone): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.load_state_dict(state, strict=False)

    # --- pieces ------------------------------------------------------------------------------
    def skeleton(self, class_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Template token ids ``(N, L)`` cut after the longest EOT, and EOT indices ``(N,)``."""
        return self.templates(class_names)

    def sample_prompts(self, global_feature: Tensor, noise: PromptNoise
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Flow samples: ISD ``(R, N, D)``, IAD ``(2, R, N or 1, D)``, and the flow losses.

        Vectorised over samples and images: one call per flow.
        """
        R = noise.isd.shape[0]
        isd = self.isd(self.isd_input(global_feature), R, eps=noise.isd)
        n_iad = noise.iad.shape[2]
        # The authors' IAD loss divides the log-det sum by the batch size N (their prior term
        # has N rows, the flow one); only meaningful with shared IAD samples.
        scale = 1.0 / global_feature.shape[0] if self.cfg.iad_logdet_per_batch else 1.0
        iad = [flow(self.iad_state[s].expand(n_iad, -1), R, eps=noise.iad[s], log_det_scale=scale)
               for s, flow in enumerate((self.iad_normal, self.iad_abnormal))]
        losses = {"isd": isd.loss, "normal": iad[0].loss, "abnormal": iad[1].loss}
        return isd.z, torch.stack([iad[0].z, iad[1].z]), losses

    def isd_input(self, global_feature: Tensor) -> Tensor:
        """What the ISD is conditioned on (``ModelConfig.isd_condition``).

        ``"unit"``: ``g / ||g||``. Adam moves every weight by about lr per step, so an
        amortised head's output moves by about ``lr * ||xi||_1`` per step: ~90 lr for the tiny
        tower v1's raw global feature (norm ~14, E = 64), i.e. u jumps by several times the 0.02
        token scale at lr 1e-3 and training amplifies a 1e-12 difference to order 1 within
        30 steps. On the unit sphere the same step is ~8 lr and the difference stays ~1e-9
        (``benchmarks/sensitivity.py``, README "Same numbers on any CPU"). CLIP compares
        global features by direction only, so the direction is what the ISD sees.
        ``"raw"``: the feature as is (the authors' code; the paper does not say).
        """
        mode = self.cfg.isd_condition
        if mode == "unit":
            return F.normalize(global_feature, dim=-1)
        if mode == "raw":
            return global_feature
        raise ValueError(f"ModelConfig.isd_condition must be 'unit' or 'raw', got {mode!r}")

    def encode_prompts(self, class_names: Sequence[str], isd: Tensor, iad: Tensor) -> Tensor:
        """All ``N x B x R x 2`` prompts in one text-tower call -> ``(N, B, R, 2, E)``."""
        ids, eot = self.skeleton(class_names)
        dev = self.bank.context.device
        ids, eot = ids.to(dev), eot.to(dev)
        tok = self.backbone.token_embedding(ids).to(self.bank.context.dtype)
        seq = self.bank.sequences(tok, isd, iad, start=1)  # (N, B, R, 2, L, D)
        n, b, r, _, length, d = seq.shape
        # Normal and abnormal prompts share [SOS] and the P context tokens (with their ISD
        # draw): that prefix runs through the text tower once per (image, bank, sample).
        p0 = 1 + self.cfg.n_ctx
        prefix = seq[:, :, :, 0, :p0].reshape(-1, p0, d)
        suffix = seq[..., p0:, :].reshape(-1, 2, length - p0, d)
        eot = eot.repeat_interleave(b * r)
        feats = self.backbone.encode_text_shared_prefix(prefix, suffix, eot)
        return feats.to(tok.dtype).view(n, b, r, 2, -1)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, images: Tensor, class_names: Sequence[str], **kw) -> BayesPFLOutput:
        """``images (N, 3, S, S)`` (CLIP-normalised) and their class names -> outputs.

        The keyword arguments are those of :meth:`forward_features`.
        """
        return self.forward_features(self.backbone.encode_image(images), class_names, **kw)

    def forward_features(self, feats: ImageFeatures, class_names: Sequence[str], *,
                         seed: int | None = None,
                         seeds: Sequence[int] | Tensor | None = None,
                         generator: torch.Generator | None = None,
                         bank_index: int | None = None, n_samples: int | None = None,
                         share_iad: bool | None = None,
                         map_std: bool = False, sample_maps: bool = False,
                         noise_scale: float = 1.0, use_rca: bool = True,
                         map_kernel: str = "fused") -> BayesPFLOutput:
        """The model on precomputed image features (:meth:`Backbone.encode_image`).

        Args:
            feats: ``global_ (N, E)``, ``patches (N, L, T, W_v)``, ``image_keys (N,)``.
            class_names: N dataset class names (mapped to words by :mod:`pfl.method.prompts`).
            seed: the run's seed: image n's noise comes from ``(seed, image_keys[n])``.
            seeds: one int per image instead: image n's noise comes only from ``seeds[n]``.
            generator: source of the training bank index, and of ``seed`` when neither
                ``seed`` nor ``seeds`` is given (None: torch's global RNG).
            bank_index: training: the bank prompt b of this step (None: drawn from
                ``generator``); inference: None uses all B, an int restricts to that one.
            n_samples: R (default ``mc_train`` in training, ``mc_test`` at inference).
            share_iad: one IAD draw for all images (default ``cfg.share_iad_samples``).
            map_std: also give ``map_std``, the per-pixel spread over the R samples (from the
                same fused pass as the maps; costs ~30 % of the map step on a CPU).
            sample_maps: also give ``sample_maps``, the R per-sample maps ``(N, R, S, S)``
                (memory: R full maps per image; for teaching the Monte Carlo mean).
            noise_scale: factor on the standard-normal noise of every flow (1: the model).
                0 gives the deterministic prompt ``z_K = h_K(...h_1(mu))``, the limit
                ``sigma -> 0`` of q0: every sample r is then the same prompt.
            use_rca: False skips RCA (``F_t' = F_t``: the text features meet the patches
                unrefined), to measure what RCA adds on a trained model.
            map_kernel: ``"fused"`` (:func:`pfl.method.maps.fused_maps`, the default, and the
                one training uses) or ``"compiled"`` (:func:`pfl.method.maps.compiled_maps`:
                one ``torch.compile`` kernel, inference only, equal to rounding).

        The head computes in its parameters' dtype whatever the features' (e.g. half
        precision features under ``torch.autocast``, see :meth:`predict`).
        """
        if map_kernel not in MAP_KERNELS:  # before any work
            raise ValueError(f"map_kernel {map_kernel!r}: use one of {sorted(MAP_KERNELS)}")
        dtype = self.tau_pix.dtype  # the model's compute dtype (float64 in smoke)
        g, patches = feats.global_.to(dtype), feats.patches.to(dtype)
        n = g.shape[0]
        if len(class_names) != n:
            raise ValueError(f"got {len(class_names)} class names for {n} images")
        R = n_samples if n_samples is not None else (
            self.cfg.mc_train if self.training else self.cfg.mc_test)
        if int(R) < 1:
            raise ValueError(f"n_samples: R must be >= 1, got {R}")
        R = int(R)
        B = self.cfg.n_prompts
        if bank_index is None and self.training:
            bank_index = int(torch.randint(B, (1,), generator=generator))
        if bank_index is not None and not 0 <= bank_index < B:
            raise ValueError(f"bank_index {bank_index} outside 0..{B - 1}")
        banks = torch.arange(B) if bank_index is None else torch.tensor([bank_index])

        share = self.cfg.share_iad_samples if share_iad is None else share_iad
        noise = prompt_noise(feats, R, self.backbone.text_width, seed=seed, seeds=seeds,
                             generator=generator, share_iad=share, dtype=dtype, device=g.device)
        if noise_scale != 1.0:
            noise = dataclasses.replace(noise, isd=noise_scale * noise.isd,
                                        iad=noise_scale * noise.iad)
        isd, iad, flow_losses = self.sample_prompts(g, noise)
        text = self.encode_prompts(class_names, isd, iad)  # (N, B, R, 2, E)
        pairs = text[:, banks.to(text.device)].reshape(n, -1, 2, text.shape[-1])  # (N, M, 2, E)
        M = pairs.shape[1]

        # Pixel logits per layer: only abnormal - normal is needed (docs/reproduction.md,
        # "Maps, scores and losses").
        fs = self.proj(patches)  # (N, L, T, E)
        text_pairs = pairs.reshape(n, 2 * M, -1)
        if use_rca:
            refined = self.rca(text_pairs, fs)
        else:  # the unrefined (unit) text features at every layer
            refined = text_pairs[:, None].expand(n, fs.shape[1], 2 * M, text_pairs.shape[-1])
        refined = refined.reshape(n, fs.shape[1], M, 2, -1)
        diff = torch.einsum("nlte,nlme->nlmt", fs, refined[..., 1, :] - refined[..., 0, :])
        gh, gw = self.backbone.grid
        diff = (self.tau_pix.exp() * diff.to(dtype)).reshape(n, fs.shape[1], M, gh, gw)
        S = self.backbone.image_size
        maps = MAP_KERNELS[map_kernel](diff, (S, S), self.cfg.official_compat,
                                       n_samples=R if map_std or sample_maps else None,
                                       keep_samples=sample_maps)
        layer_maps = maps.layer_maps

        # Global logits through phi (docs/reproduction.md, "Maps, scores and losses").
        t_img = F.normalize(self.phi(pairs), dim=-1)
        g_img = self.global_head(g, patches) if self.second_stage_active else g
        glob = self.tau_img.exp() * torch.einsum("nmse,ne->nms", t_img,
                                                 F.normalize(g_img, dim=-1))
        score = glob.softmax(-1)[..., 1].mean(1)
        return BayesPFLOutput(
            anomaly_map=layer_maps.mean(1), layer_maps=layer_maps, pixel_logits=diff,
            global_logits=glob, score=score, text_features=text, flow_losses=flow_losses,
            banks=banks, n_samples=R, map_std=maps.sample_std if map_std else None,
            sample_maps=maps.sample_maps,
        )

    @property
    def second_stage_active(self) -> bool:
        """Whether the image logits use the second-stage head (``ModelConfig.second_stage``)."""
        return self.global_head is not None and int(self.image_stage) == 2

    def begin_second_stage(self) -> list[nn.Parameter]:
        """Switch to the authors' second stage; returns the parameters it trains.

        From now on the image logits use the second-stage head and :meth:`training_step`
        optimises the CE loss only; only ``phi`` (their ``class_mapping``) and the head
        (``image_mapping``, ``fuse``) train. The maps do not change.
        """
        if self.global_head is None:
            raise ValueError("begin_second_stage needs ModelConfig.second_stage=True")
        self.image_stage.fill_(2)
        return [*self.phi.parameters(), *self.global_head.parameters()]

    # --- loss --------------------------------------------------------------------------------
    def pixel_probs(self, out: BayesPFLOutput) -> Tensor:
        """Abnormal probability per layer and pair at image size, ``(L, M * N, S, S)``.

        Pairs are stacked pair-major along the batch dim (pair m holds rows m*N..m*N+N-1), so
        the focal and dice means over images are also the Monte Carlo means over pairs.
        """
        n, L, M = out.pixel_logits.shape[:3]
        if M == 1:
            return out.layer_maps.transpose(0, 1)
        S = self.backbone.image_size
        up = F.interpolate(out.pixel_logits.reshape(n, L * M, *out.pixel_logits.shape[-2:]),
                           size=(S, S), mode="bilinear", align_corners=self.cfg.official_compat)
        return torch.sigmoid(up).view(n, L, M, S, S).permute(1, 2, 0, 3, 4).reshape(L, M * n, S, S)

    def loss(self, out: BayesPFLOutput, masks: Tensor, labels: Tensor,
             cfg: TrainConfig | None = None) -> LossTerms:
        """The training loss of ``out`` (:func:`pfl.method.losses.bayes_pfl_loss`).

        Args:
            out: a training-mode output.
            masks: ``(N, S, S)`` ground-truth masks at the model's image size.
            labels: ``(N,)`` 0 normal / 1 abnormal.
            cfg: loss weights (``flow_weight``, ``ort_weight``, ``focal_gamma``).

        L_ort runs over each image's normal bank and abnormal bank (B text features each,
        per sample).
        """
        n, M = out.global_logits.shape[:2]
        if masks.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"{masks.shape[0]} masks and {labels.shape[0]} labels for {n} "
                             "images: give one of each per image")
        masks = masks.to(out.layer_maps.dtype).repeat(M, 1, 1)
        text = out.text_features
        banks = text.permute(0, 2, 3, 1, 4).reshape(-1, text.shape[1], text.shape[-1])
        return bayes_pfl_loss(
            self.pixel_probs(out), masks, out.global_logits.transpose(0, 1), labels,
            flow_losses=out.flow_losses, text_banks=banks, cfg=cfg,
        )

    # --- the harness contract (pfl.method.contract.Method) -------------------------------
    def _batch_features(self, batch: Batch) -> ImageFeatures:
        return batch.features(self.backbone).to(self.tau_pix.device)

    def training_step(self, batch: Batch, generator: torch.Generator,
                      shard: Shard | None = None) -> StepLoss:
        """One training batch: bank index and the step's seed from ``generator``; every term.

        ``shard`` (DDP, :mod:`pfl.run.distributed`): ``batch`` holds rows ``start:stop`` of a
        global batch of ``total`` images. Every rank draws the step's bank index and seed from
        the same generator, as one process does, and each image's noise comes from that seed
        and the image's content (:mod:`pfl.method.sampling`), so every image gets the noise it
        gets in one process. Every term is a mean over images, so the loss is the mean over
        this shard; an empty shard draws the same and gives a zero that reaches every parameter.
        """
        if shard is not None and shard.stop - shard.start != len(batch):
            raise ValueError(f"shard {shard} does not match a batch of {len(batch)} images")
        bank = int(torch.randint(self.cfg.n_prompts, (1,), generator=generator))
        seed = draw_seeds(1, generator)[0]
        if not len(batch):
            return StepLoss(sum(p.sum() for p in self.trainable_parameters()) * 0.0, {})
        if batch.masks is None or batch.labels is None:
            raise ValueError("training_step needs a Batch with masks and labels")
        out = self.forward_features(self._batch_features(batch), batch.cls_names,
                                    seed=seed, bank_index=bank)
        dev = out.layer_maps.device
        terms = self.loss(out, batch.masks.to(dev), batch.labels.to(dev), self.train_cfg)
        # The authors' second stage trains on the CE loss alone (the other terms are logged).
        total = terms.cls if self.second_stage_active else terms.total
        return StepLoss(total, terms.as_dict())

    def skip_predict(self, n_images: int, generator: torch.Generator) -> None:
        """Nothing to skip: :meth:`predict` draws nothing from ``generator`` (it reads its seed
        only), so a rank of a sharded evaluation starts where one process would be."""

    def predict(self, batch: Batch, generator: torch.Generator,
                n_samples: int | None = None, *, map_std: bool = False,
                precision: str | None = None, noise_scale: float = 1.0,
                use_rca: bool = True, map_kernel: str = "fused") -> Prediction:
        """Anomaly maps ``(N, S, S)`` and global scores ``(N,)`` (no gradients).

        The run's seed is ``generator.initial_seed()`` (the generator's state is not used), so
        each image's noise depends on that seed and the image only
        (:mod:`pfl.method.sampling`): any batching or order gives the same maps and scores.

        Args:
            n_samples: R (default ``cfg.mc_test``; ``EvalConfig.mc_samples`` in evaluation).
            map_std: also fill ``Prediction.map_std`` (per-pixel standard deviation over the R
                Monte Carlo samples of the per-sample map).
            precision: None computes in the parameters' dtype; ``"fp16"`` or ``"bf16"`` runs
                the towers, RCA and the logits under ``torch.autocast`` in that half
                precision (for GPUs; the upsampling, sigmoid and means stay in the
                parameters' dtype). Its error against full precision is measured by
                ``benchmarks/inference.py --half``.
            noise_scale, use_rca: as :meth:`forward_features` (0 and False are for teaching
                and ablations: the deterministic prompt, Bayes-PFL without RCA).
            map_kernel: as :meth:`forward_features` (``"compiled"``: faster, needs a compiler).
        """
        with torch.no_grad(), half_precision(self.tau_pix.device, precision):
            out = self.forward_features(self._batch_features(batch), batch.cls_names,
                                        seed=generator.initial_seed(), n_samples=n_samples,
                                        map_std=map_std, noise_scale=noise_scale,
                                        use_rca=use_rca, map_kernel=map_kernel)
        return Prediction(maps=out.anomaly_map, scores=out.score, map_std=out.map_std)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAP_KERNELS = {"fused": fused_maps, "compiled": compiled_maps}


def half_precision(device: torch.device, precision: str | None):
    """``torch.autocast`` to ``HALF[precision]`` on ``device``; a no-op context for None."""
    if precision is None:
        return nullcontext()
    if precision not in HALF:
        raise ValueError(f"precision {precision!r}: use None, 'fp16' or 'bf16'")
    return torch.autocast(device_type=device.type, dtype=HALF[precision])
