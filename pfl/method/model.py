"""Bayes-PFL: frozen CLIP + prompt banks + prompt flows + RCA -> anomaly maps and scores.

REFERENCE.md, "Prompts", "Prompt flow (ISD and IAD)", "RCA", "Maps, scores, losses";
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

Randomness: every image draws its noise from its own ``torch.Generator`` stream (a seed per
image, given or drawn from one generator), so an image's result does not depend on the other
images of its batch. The authors' code pairs each image with the ISD samples of every image
of the batch when the batch has more than one image; ``pfl`` does not reproduce that.

``official_compat=True`` switches to the authors' code where it differs from the paper:
``f_mu``/``f_sigma`` hidden width ``vision_width // 2`` (paper: the joint width C),
``sigma = exp(s / 4)`` in the flows (:class:`pfl.method.flows.GaussianEncoder`), bilinear
upsampling with ``align_corners=True``, and the dice loss on both maps
(:func:`pfl.method.losses.dice_loss`). ``share_iad_samples=True`` is the authors' inference: the
IAD noise is drawn once (from the first image's stream) and reused for every later image
until :meth:`BayesPFL.reset_shared_iad`; in training it is drawn once per step for the batch.

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

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.clip.backbone import Backbone, ImageFeatures
from pfl.config import ModelConfig, TrainConfig
from pfl.method.contract import Batch, Prediction, StepLoss
from pfl.method.flows import GaussianEncoder, PromptFlow
from pfl.method.losses import LossTerms, bayes_pfl_loss
from pfl.method.maps import fused_maps
from pfl.method.prompts import PromptBank, build_skeleton

TAU_INIT = math.log(1 / 0.07)  # REFERENCE.md "Maps, scores, losses": tau init log(1/0.07)
_SEED_HIGH = 2**62  # per-image seeds drawn from a generator lie in [0, 2^62)


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


class LayerProjections(nn.Module):
    """Per-layer bias-free ``Linear(W_v -> E)``, then L2 normalisation (REFERENCE.md "Backbone").

    One ``(L, E, W_v)`` weight so that all layers are one ``einsum``.
    """

    def __init__(self, n_layers: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_layers, out_dim, in_dim))

    def forward(self, patches: Tensor) -> Tensor:
        """``(N, L, T, W_v) -> F_s (N, L, T, E)``, unit norm."""
        return F.normalize(torch.einsum("nltw,lew->nlte", patches, self.weight), dim=-1)


class RCA(nn.Module):
    """Text refinement with the patches of each layer (REFERENCE.md "RCA").

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

    def __init__(self, backbone: Backbone, cfg: ModelConfig | None = None, seed: int = 0,
                 train_cfg: TrainConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.backbone = cfg, backbone
        self.train_cfg = train_cfg or TrainConfig()
        E, W, D = backbone.embed_dim, backbone.vision_width, backbone.text_width
        # Paper: hidden width C of f_mu/f_sigma; the authors' code: vision width / 2.
        hidden = cfg.mlp_hidden or (W // 2 if cfg.official_compat else E)
        gen = torch.Generator().manual_seed(seed)
        # torch's default inits (flows) use the global RNG: seed it without disturbing callers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proj = LayerProjections(len(backbone.layers), W, E)
            self.bank = PromptBank(cfg.n_prompts, cfg.n_ctx, cfg.n_state, D, generator=gen)
            flow_kw = dict(hidden=hidden, n_steps=cfg.flow_length, flow_type=cfg.flow_type,
                           invertible=cfg.invertible, official_compat=cfg.official_compat)
            self.isd = PromptFlow(D, E, amortised=True, **flow_kw)
            self.iad_encoder = GaussianEncoder(E, D, hidden, cfg.official_compat)
            self.iad_normal = PromptFlow(D, E, amortised=False, encoder=self.iad_encoder,
                                         **flow_kw)
            self.iad_abnormal = PromptFlow(D, E, amortised=False, encoder=self.iad_encoder,
                                           **flow_kw)
            # Free IAD conditioning vectors (normal, abnormal); N(0, 1) as in the code.
            self.iad_state = nn.Parameter(torch.randn(2, E, generator=gen))
            self.rca = RCA(E, cfg.rca_heads)
            self.phi = nn.Linear(E, E)
        nn.init.normal_(self.proj.weight, std=0.02, generator=gen)
        _init_linear(self.rca, gen)
        _init_linear(self.phi, gen)
        self.tau_pix = nn.Parameter(torch.tensor(TAU_INIT))
        self.tau_img = nn.Parameter(torch.tensor(TAU_INIT))
        self._skeletons: dict[str, tuple[Tensor, int]] = {}
        self._shared_iad_eps: Tensor | None = None

    # --- bookkeeping -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new modules only (CLIP stays frozen)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by the authors' learning-rate groups (REFERENCE.md "losses").

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

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state of the new modules only (what a checkpoint needs; CLIP is loaded apart)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; the key sets must match exactly."""
        want = set(self.trainable_state_dict())
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit this BayesPFL (check its ModelConfig and backbone): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.load_state_dict(state, strict=False)
        self.reset_shared_iad()

    def train(self, mode: bool = True) -> BayesPFL:
        super().train(mode)
        self.reset_shared_iad()
        return self

    def reset_shared_iad(self) -> None:
        """Forget the IAD noise kept by ``share_iad_samples`` (the next image draws anew)."""
        self._shared_iad_eps = None

    # --- pieces ------------------------------------------------------------------------------
    def skeleton(self, class_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Template token ids ``(N, L)`` cut after the longest EOT, and EOT indices ``(N,)``."""
        missing = [c for c in dict.fromkeys(class_names) if c not in self._skeletons]
        if missing:
            sk = build_skeleton(self.backbone.tokenize, missing, self.cfg.n_ctx,
                                self.cfg.n_state, self.cfg.class_aware)
            for i, c in enumerate(missing):
                self._skeletons[c] = (sk.ids[i, : int(sk.eot[i]) + 1], int(sk.eot[i]))
        eot = torch.tensor([self._skeletons[c][1] for c in class_names])
        ids = torch.zeros(len(class_names), int(eot.max()) + 1, dtype=torch.long)
        for i, c in enumerate(class_names):
            row = self._skeletons[c][0]
            ids[i, : row.numel()] = row
        return ids, eot

    def image_seeds(self, n: int, seeds: Sequence[int] | Tensor | None,
                    generator: torch.Generator | None) -> list[int]:
        """One seed per image: ``seeds`` as given, else drawn from ``generator``."""
        if seeds is None:
            return torch.randint(_SEED_HIGH, (n,), generator=generator).tolist()
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {n} images; give one each")
        return seeds

    def _noise(self, seeds: list[int], n_samples: int, device, dtype) -> Tensor:
        # Per image one (3, R, D) block from its own stream: ISD, IAD normal, IAD abnormal.
        D = self.backbone.text_width
        eps = [torch.randn((3, n_samples, D), generator=torch.Generator().manual_seed(s))
               for s in seeds]
        return torch.stack(eps, dim=2).to(device=device, dtype=dtype)  # (3, R, N, D)

    def _iad_noise(self, eps: Tensor) -> Tensor:
        """IAD noise ``(2, R, N or 1, D)`` per ``share_iad_samples`` (see module docstring)."""
        if not self.cfg.share_iad_samples:
            return eps[1:]
        first = eps[1:, :, :1]
        if self.training:
            return first
        cached = self._shared_iad_eps
        if cached is None or cached.shape != first.shape:
            self._shared_iad_eps = cached = first.detach().clone()
        return cached.to(first.device)

    def sample_prompts(self, global_feature: Tensor, eps: Tensor, iad_eps: Tensor
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Flow samples: ISD ``(R, N, D)``, IAD ``(2, R, N or 1, D)``, and the flow losses.

        Vectorised over samples and images: one call per flow.
        """
        R = eps.shape[0]
        isd = self.isd(global_feature, R, eps=eps)
        n_iad = iad_eps.shape[2]
        iad = [flow(self.iad_state[s].expand(n_iad, -1), R, eps=iad_eps[s])
               for s, flow in enumerate((self.iad_normal, self.iad_abnormal))]
        losses = {"isd": isd.loss, "normal": iad[0].loss, "abnormal": iad[1].loss}
        return isd.z, torch.stack([iad[0].z, iad[1].z]), losses

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
    def forward(self, images: Tensor, class_names: Sequence[str], *,
                generator: torch.Generator | None = None,
                seeds: Sequence[int] | Tensor | None = None,
                bank_index: int | None = None, n_samples: int | None = None,
                map_std: bool = False) -> BayesPFLOutput:
        """``images (N, 3, S, S)`` (CLIP-normalised) and their class names -> outputs.

        See :meth:`forward_features` for the other arguments.
        """
        return self.forward_features(self.backbone.encode_image(images), class_names,
                                     generator=generator, seeds=seeds, bank_index=bank_index,
                                     n_samples=n_samples, map_std=map_std)

    def forward_features(self, feats: ImageFeatures, class_names: Sequence[str], *,
                         generator: torch.Generator | None = None,
                         seeds: Sequence[int] | Tensor | None = None,
                         bank_index: int | None = None,
                         n_samples: int | None = None, map_std: bool = False) -> BayesPFLOutput:
        """The model on precomputed image features (:meth:`Backbone.encode_image`).

        Args:
            feats: ``global_ (N, E)``, ``patches (N, L, T, W_v)``.
            class_names: N dataset class names (mapped to words by :mod:`pfl.method.prompts`).
            generator: source of the training bank index and of the per-image seeds when
                ``seeds`` is None (None: torch's global RNG).
            seeds: one int per image; image n's noise comes only from ``seeds[n]``.
            bank_index: training: the bank prompt b of this step (None: drawn from
                ``generator``); inference: None uses all B, an int restricts to that one.
            n_samples: R (default ``mc_train`` in training, ``mc_test`` at inference).
            map_std: also give ``map_std``, the per-pixel spread over the R samples (from the
                same fused pass as the maps; costs ~30 % of the map step on a CPU).

        The head computes in its parameters' dtype whatever the features' (e.g. half
        precision features under ``torch.autocast``, see :meth:`predict`).
        """
        dtype = self.tau_pix.dtype
        g, patches = feats.global_.to(dtype), feats.patches.to(dtype)
        n = g.shape[0]
        if len(class_names) != n:
            raise ValueError(f"got {len(class_names)} class names for {n} images")
        R = n_samples or (self.cfg.mc_train if self.training else self.cfg.mc_test)
        B = self.cfg.n_prompts
        if bank_index is None and self.training:
            bank_index = int(torch.randint(B, (1,), generator=generator))
        if bank_index is not None and not 0 <= bank_index < B:
            raise ValueError(f"bank_index {bank_index} outside 0..{B - 1}")
        banks = torch.arange(B) if bank_index is None else torch.tensor([bank_index])

        eps = self._noise(self.image_seeds(n, seeds, generator), R, g.device, g.dtype)
        isd, iad, flow_losses = self.sample_prompts(g, eps[0], self._iad_noise(eps))
        text = self.encode_prompts(class_names, isd, iad)  # (N, B, R, 2, E)
        pairs = text[:, banks.to(text.device)].reshape(n, -1, 2, text.shape[-1])  # (N, M, 2, E)
        M = pairs.shape[1]

        # Pixel logits per layer: only abnormal - normal is needed (REFERENCE.md "Maps").
        fs = self.proj(patches)  # (N, L, T, E)
        refined = self.rca(pairs.reshape(n, 2 * M, -1), fs).view(n, fs.shape[1], M, 2, -1)
        diff = torch.einsum("nlte,nlme->nlmt", fs, refined[..., 1, :] - refined[..., 0, :])
        gh, gw = self.backbone.grid
        diff = (self.tau_pix.exp() * diff.to(dtype)).reshape(n, fs.shape[1], M, gh, gw)
        S = self.backbone.image_size
        maps = fused_maps(diff, (S, S), self.cfg.official_compat, n_samples=R if map_std else None)
        layer_maps = maps.layer_maps

        # Global logits through phi (REFERENCE.md "Maps, scores, losses").
        t_img = F.normalize(self.phi(pairs), dim=-1)
        glob = self.tau_img.exp() * torch.einsum("nmse,ne->nms", t_img, F.normalize(g, dim=-1))
        score = glob.softmax(-1)[..., 1].mean(1)
        return BayesPFLOutput(
            anomaly_map=layer_maps.mean(1), layer_maps=layer_maps, pixel_logits=diff,
            global_logits=glob, score=score, text_features=text, flow_losses=flow_losses,
            banks=banks, n_samples=R, map_std=maps.sample_std,
        )

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
            official_compat=self.cfg.official_compat,
        )

    # --- the harness contract (pfl.method.contract.Method) -------------------------------
    def _batch_features(self, batch: Batch) -> ImageFeatures:
        feats = batch.features(self.backbone)
        dev = self.tau_pix.device
        return ImageFeatures(global_=feats.global_.to(dev), patches=feats.patches.to(dev))

    def training_step(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        """One training batch: bank index and per-image seeds from ``generator``; every term."""
        if batch.masks is None or batch.labels is None:
            raise ValueError("training_step needs a Batch with masks and labels")
        out = self.forward_features(self._batch_features(batch), batch.cls_names,
                                    generator=generator)
        dev = out.layer_maps.device
        terms = self.loss(out, batch.masks.to(dev), batch.labels.to(dev), self.train_cfg)
        return StepLoss(terms.total, terms.as_dict())

    @contextmanager
    def inference_samples(self, n_samples: int):
        """R = ``n_samples`` at inference inside the ``with`` block (``EvalConfig.mc_samples``)."""
        if int(n_samples) < 1:
            raise ValueError(f"inference_samples: R must be >= 1, got {n_samples}")
        saved = self.cfg
        self.cfg = replace(saved, mc_test=int(n_samples))
        try:
            yield self
        finally:
            self.cfg = saved

    def predict(self, batch: Batch, generator: torch.Generator, *, map_std: bool = False,
                precision: str | None = None) -> Prediction:
        """Anomaly maps ``(N, S, S)`` and global scores ``(N,)`` (no gradients).

        The per-image seeds are drawn from ``generator`` in image order, so with one generator
        over a dataset each image's draws do not depend on the batch size.

        Args:
            map_std: also fill ``Prediction.map_std`` (per-pixel standard deviation over the R
                Monte Carlo samples of the per-sample map).
            precision: None computes in the parameters' dtype; ``"fp16"`` or ``"bf16"`` runs
                the towers, RCA and the logits under ``torch.autocast`` in that half
                precision (for GPUs; the upsampling, sigmoid and means stay in the
                parameters' dtype). Its error against full precision is measured by
                ``benchmarks/inference.py --precision``.
        """
        with torch.no_grad(), half_precision(self.tau_pix.device, precision):
            out = self.forward_features(self._batch_features(batch), batch.cls_names,
                                        generator=generator, map_std=map_std)
        return Prediction(maps=out.anomaly_map, scores=out.score, map_std=out.map_std)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def half_precision(device: torch.device, precision: str | None):
    """``torch.autocast`` to ``HALF[precision]`` on ``device``; a no-op context for None."""
    if precision is None:
        return nullcontext()
    if precision not in HALF:
        raise ValueError(f"precision {precision!r}: use None, 'fp16' or 'bf16'")
    return torch.autocast(device_type=device.type, dtype=HALF[precision])
