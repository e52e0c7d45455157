"""What the posterior of a Bayes-PFL model looks like: |mu|, sigma, spreads, prompt distances.

For a :class:`pfl.method.model.BayesPFL` and a fixed set of images (precomputed features),
:func:`posterior_diagnostics` measures the prompt distributions and their effect:

* the initial distributions ``q0 = N(mu, diag sigma^2)`` (Algorithm 1, lines 1 and 5): the
  ISD's ``|mu(g)|`` and mean ``sigma(g)`` (mean over images), and the same for each IAD flow on
  its free state vector;
* the flow outputs ``z_K``: their standard deviation over the R draws (mean over images and
  width), i.e. how far the prompts actually wander;
* the encoded text features: ``L_ort`` (:func:`pfl.method.losses.orthogonal_loss`, 1 when the
  B prompts of a bank coincide) and the mean pairwise cosine distance ``1 - cos`` between the
  B prompts of the normal bank and of the abnormal bank;
* the anomaly maps: the mean over pixels of the per-pixel standard deviation over the R
  samples (``BayesPFLOutput.map_std``).

The call runs in eval mode without gradients and draws its noise only from its own ``seed``
(per image, :mod:`pfl.method.sampling`): it touches no generator a training loop uses, so
training with the diagnostics on gives the same weights as without.

Standard deviations over the R draws are population ones (``correction=0``, as
:mod:`pfl.method.maps`): one draw gives a spread of 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pfl.clip.backbone import ImageFeatures
from pfl.method.losses import orthogonal_loss
from pfl.method.model import BayesPFL
from pfl.method.sampling import prompt_noise

FLOWS = ("isd", "normal", "abnormal")
KEYS = (*(f"{f}_{k}" for f in FLOWS for k in ("mu", "sigma", "z_std")),
        "ort", "dist_normal", "dist_abnormal", "map_std")


def mean_cosine_distance(bank: Tensor) -> Tensor:
    """Mean over ordered pairs ``i != j`` of ``1 - cos(f_i, f_j)`` for banks ``(..., B, E)``,
    mean over the leading dims; 0 for a bank of one prompt (no pairs)."""
    n = bank.shape[-2]
    if n < 2:
        return bank.new_zeros(())
    f = F.normalize(bank, dim=-1)
    cos = f @ f.transpose(-1, -2)
    off = cos.sum((-1, -2)) - torch.diagonal(cos, dim1=-2, dim2=-1).sum(-1)
    return (1.0 - off / (n * (n - 1))).mean()


def posterior_diagnostics(model: BayesPFL, feats: ImageFeatures, class_names: Sequence[str],
                          n_samples: int | None = None, seed: int = 0,
                          noise_scale: float = 1.0) -> dict[str, float]:
    """The posterior's state on ``feats`` (module docstring); keys :data:`KEYS`.

    Args:
        model: a Bayes-PFL model; its train/eval mode is restored afterwards.
        feats: ``global_ (N, E)``, ``patches (N, L, T, W)``, ``image_keys`` of N images.
        class_names: their N category names.
        n_samples: R (default ``model.cfg.mc_test``); the spreads need ``R >= 2`` to be > 0.
        seed: the noise of image n comes from ``(seed, image_keys[n])``, as at inference.
        noise_scale: factor on the flows' noise (:meth:`BayesPFL.forward_features`); 0 gives
            the deterministic prompt, so every spread is 0 (q0's ``mu``, ``sigma`` unchanged).

    Returns:
        ``{isd,normal,abnormal}_mu``: mean ``|mu|_2`` of q0; ``..._sigma``: mean of q0's
        ``sigma`` (over images and the D entries); ``..._z_std``: mean standard deviation of
        ``z_K`` over the R draws; ``ort``: L_ort over every (image, sample, normal/abnormal)
        bank of B text features; ``dist_normal``, ``dist_abnormal``: mean pairwise cosine
        distance between the B prompts' text features; ``map_std``: mean per-pixel standard
        deviation of the anomaly map over the R samples.
    """
    was_training = model.training
    dtype = model.tau_pix.dtype
    R = int(n_samples if n_samples is not None else model.cfg.mc_test)
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            g = feats.global_.to(device=model.tau_pix.device, dtype=dtype)
            out: dict[str, float] = {}
            q0 = {"isd": model.isd.encoder(model.isd_input(g)),
                  "normal": model.iad_encoder(model.iad_state[0:1]),
                  "abnormal": model.iad_encoder(model.iad_state[1:2])}
            # The same noise forward_features draws for (seed, R): z_K of the maps below.
            noise = prompt_noise(feats, R, model.backbone.text_width, seed=seed,
                                 share_iad=model.cfg.share_iad_samples, dtype=dtype,
                                 device=g.device)
            noise = dataclasses.replace(noise, isd=noise_scale * noise.isd,
                                        iad=noise_scale * noise.iad)
            isd, iad, _ = model.sample_prompts(g, noise)
            z = {"isd": isd, "normal": iad[0], "abnormal": iad[1]}
            for name in FLOWS:
                mu, sigma = q0[name]
                out[f"{name}_mu"] = float(mu.norm(dim=-1).mean())
                out[f"{name}_sigma"] = float(sigma.mean())
                out[f"{name}_z_std"] = float(z[name].std(0, correction=0).mean())
            res = model.forward_features(feats, class_names, seed=seed, n_samples=R,
                                         map_std=True, noise_scale=noise_scale)
            text = res.text_features  # (N, B, R, 2, E)
            banks = text.permute(0, 2, 3, 1, 4)  # (N, R, 2, B, E)
            out["ort"] = float(orthogonal_loss(banks.reshape(-1, *banks.shape[-2:])))
            out["dist_normal"] = float(mean_cosine_distance(banks[:, :, 0]))
            out["dist_abnormal"] = float(mean_cosine_distance(banks[:, :, 1]))
            out["map_std"] = float(res.map_std.mean())
    finally:
        model.train(was_training)
    return {k: out[k] for k in KEYS}
