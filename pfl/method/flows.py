"""Planar prompt flows: the step, the K-stack, the Gaussian start q0, and the ISD/IAD module.

docs/reproduction.md, "Prompt flow"; appendix Algorithm 1, Eq. A.1 and Eq. A.5.

A planar step (Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015)
maps ``z' = z + u tanh(w^T z + b)``. By the matrix determinant lemma its Jacobian
``I + u psi^T`` with ``psi = (1 - tanh^2(w^T z + b)) w`` has ``det = 1 + u^T psi``.
The step is invertible when ``w^T u >= -1``; the paper (and the authors' code) leave ``u``
unconstrained, the flow literature replaces it with ``u_hat`` (``invertible=True``).

Shapes follow the symbols of the paper: R Monte Carlo samples, N conditioning vectors
(images), D the prompt (token embedding) width, K the flow length, C the conditioning width.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> flow = PromptFlow(dim=8, cond_dim=6, n_steps=3, amortised=True)
>>> out = flow(torch.randn(4, 6, generator=g), n_samples=5, generator=g)
>>> tuple(out.z.shape), tuple(out.loss.shape)
((5, 4, 8), (4,))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfl.method.sampling import draw_noise, draw_seeds

FLOW_TYPES = ("planar", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)
_U_HAT_ZERO = math.log(math.e - 1.0)  # w^T u at which m(w^T u) = 0, i.e. u_hat = 0


def _safe_log_abs(x: Tensor) -> Tensor:
    # Exact wherever |x| > 0; a non-invertible step (x == 0) gives a large finite negative
    # number instead of -inf, so one bad sample cannot turn a whole batch's loss into NaN.
    return torch.log(torch.abs(x).clamp_min(torch.finfo(x.dtype).tiny))


def invertible_u(u: Tensor, w: Tensor) -> Tensor:
    """``u_hat = u + (m(w^T u) - w^T u) w / ||w||^2`` with ``m(x) = -1 + softplus(x)``.

    Then ``w^T u_hat = m(w^T u) > -1``, which makes the planar step invertible
    (Rezende & Mohamed 2015, appendix A). Shapes: ``u, w (..., D)`` broadcastable.

    Note:
        The margin ``w^T u_hat + 1 = exp(w^T u)`` (for very negative ``w^T u``) falls below the
        rounding error of ``w^T u_hat`` once ``w^T u`` is below about -30 in float64 (-13 in
        float32); such a step is numerically singular even though it is invertible on paper.

    >>> u, w = torch.tensor([-3.0, 0.0]), torch.tensor([1.0, 0.0])
    >>> float((w * invertible_u(u, w)).sum()) > -1
    True
    """
    wu = (w * u).sum(-1, keepdim=True)
    w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (F.softplus(wu) - 1.0 - wu) * w / w_sq


def planar_step(
    z: Tensor, u: Tensor, w: Tensor, b: Tensor, invertible: bool = False
) -> tuple[Tensor, Tensor]:
    """One planar step ``z' = z + u tanh(w^T z + b)`` and its ``log|det dz'/dz|``.

    ``log|det| = log|1 + u^T psi|``, ``psi = (1 - tanh^2(w^T z + b)) w`` (matrix determinant
    lemma; docs/reproduction.md, "Prompt flow", appendix Eq. A.1).

    Args:
        z: ``(..., D)`` points.
        u, w: ``(..., D)``, broadcastable against ``z`` (per-sample amortised parameters are
            ``(N, D)`` against ``z (R, N, D)``; free ones are ``(D,)``).
        b: ``(...)`` broadcastable against ``z[..., 0]``; a 0-d tensor for free parameters.
        invertible: replace ``u`` by :func:`invertible_u` (``w^T u_hat > -1``); the paper
            and the authors' code use ``u`` as is (``False``).

    Returns:
        ``(z_new (..., D), log_abs_det (...))``. Where the step is singular
        (``1 + u^T psi = 0``) the log-det is clamped to ``log(finfo.tiny)`` instead of -inf.
    """
    if invertible:
        u = invertible_u(u, w)
    return _planar_core(z, u, w, b, (w * u).sum(-1))


def _planar_core(z: Tensor, u: Tensor, w: Tensor, b: Tensor, wu: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.tanh((w * z).sum(-1) + b)
    z_new = z + u * h.unsqueeze(-1)
    # u^T psi = (1 - h^2) w^T u: psi is never formed
    return z_new, _safe_log_abs(1.0 + (1.0 - h * h) * wu)


def planar_flow(
    z0: Tensor, u: Tensor, w: Tensor, b: Tensor, invertible: bool = False
) -> tuple[Tensor, Tensor]:
    """K planar steps ``z_K = h_K(...h_1(z0))`` and ``sum_k log|det_k|`` (Algorithm 1, line 6).

    Args:
        z0: ``(..., D)``.
        u, w: ``(K, ..., D)``: step ``k`` uses ``u[k], w[k]`` (broadcast as in
            :func:`planar_step`).
        b: ``(K, ...)``.
        invertible: see :func:`planar_step`.

    Returns:
        ``(z_K (..., D), sum_log_det (...))``; with ``K = 0`` the identity and zeros.

    Only the K steps are a Python loop; samples and images are vectorised.
    """
    if not (u.shape[0] == w.shape[0] == b.shape[0]):
        raise ValueError(
            f"planar_flow: u, w, b need the same number of steps K in dim 0, got "
            f"{tuple(u.shape)}, {tuple(w.shape)}, {tuple(b.shape)}"
        )
    if invertible:
        u = invertible_u(u, w)  # all K at once; the loop below is the same as planar_step's
    wu = (w * u).sum(-1)
    z = z0
    total = z0.new_zeros(z0.shape[:-1])
    for k in range(u.shape[0]):
        z, log_det = _planar_core(z, u[k], w[k], b[k], wu[k])
        total = total + log_det
    return z, total


def std_normal_log_prob(z: Tensor, scale: float = 1.0) -> Tensor:
    """``log N(z; 0, scale^2 I)`` summed over the last dim: ``(..., D) -> (...)``.

    ``scale = 1`` is the paper's prior ``N(0, I)``; see ``PromptFlow``'s ``prior_std``.
    """
    if scale == 1.0:
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * _LOG_2PI
    y = z / scale
    return -0.5 * (y * y).sum(-1) - z.shape[-1] * (math.log(scale) + 0.5 * _LOG_2PI)


def gaussian_kl_to_std_normal(mu: Tensor, std: Tensor, scale: float = 1.0) -> Tensor:
    """Closed-form ``KL(N(mu, diag std^2) || N(0, scale^2 I))`` (appendix Eq. A.5 for
    ``scale = 1``): ``(..., D) -> (...)``.

    ``0.5 * sum(std^2 / s^2 + mu^2 / s^2 - 1 - 2 log(std / s))``.

    >>> float(gaussian_kl_to_std_normal(torch.zeros(3), torch.ones(3)))
    0.0
    >>> float(gaussian_kl_to_std_normal(torch.zeros(3), torch.full((3,), 0.02), scale=0.02))
    0.0
    """
    r, m = std / scale, mu / scale
    return 0.5 * (r * r + m * m - 1.0 - 2.0 * torch.log(r)).sum(-1)


def reset_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """torch's default ``nn.Linear`` init (uniform, bound ``1 / sqrt(fan_in)`` for the bias,
    Kaiming-uniform with ``a = sqrt(5)`` for the weight) drawn from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _linear(in_dim: int, out_dim: int, generator: torch.Generator | None) -> nn.Linear:
    if generator is None:
        return nn.Linear(in_dim, out_dim)
    with torch.random.fork_rng(devices=[]):  # the throw-away default init: global RNG untouched
        layer = nn.Linear(in_dim, out_dim)
    reset_linear(layer, generator)
    return layer


def _mlp(in_dim: int, hidden: int, out_dim: int,
         generator: torch.Generator | None = None) -> nn.Sequential:
    return nn.Sequential(
        _linear(in_dim, hidden, generator),
        nn.Softplus(),
        _linear(hidden, hidden, generator),
        nn.Softplus(),
        _linear(hidden, out_dim, generator),
    )


class GaussianEncoder(nn.Module):
    """The initial distribution ``q0 = N(mu(xi), diag sigma(xi)^2)`` (Algorithm 1, lines 1, 5).

    ``f_mu`` and ``f_sigma``: 3 Linear layers ``C_in -> hidden -> hidden -> D`` with Softplus
    between them (appendix A.1; ``hidden`` = the joint width C in the paper, 512 in the
    authors' code).

    Standard deviation: Algorithm 1 draws ``mu + eps * Sigma(xi)``, so ``f_sigma`` gives a
    standard deviation; the paper does not say how it is kept positive. Default (paper):
    ``sigma = softplus(s)``. ``official_compat=True``: the authors' ``var = exp(0.5 s)``,
    ``sigma = sqrt(var) = exp(s / 4)``.

    Note:
        Init: the last layer of ``f_mu`` is zero (``mu = 0``) and the last layer of
        ``f_sigma`` has zero weights and the bias giving ``sigma = init_std`` for every
        ``xi``. The samples are added to token embeddings of std ~0.02, so the default
        ``init_std = 0.02`` starts the prompts near their learned means instead of drowning
        them in unit-variance noise. Other weights: torch's default init, drawn from
        ``generator`` (None: torch's global RNG).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        hidden: int | None = None,
        official_compat: bool = False,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if init_std <= 0:
            raise ValueError(f"GaussianEncoder: init_std must be > 0, got {init_std}")
        hidden = in_dim if hidden is None else hidden
        self.dim, self.official_compat = dim, official_compat
        self.f_mu = _mlp(in_dim, hidden, dim, generator)
        self.f_sigma = _mlp(in_dim, hidden, dim, generator)
        with torch.no_grad():
            self.f_mu[-1].weight.zero_()
            self.f_mu[-1].bias.zero_()
            self.f_sigma[-1].weight.zero_()
            if official_compat:
                s0 = 4.0 * math.log(init_std)  # exp(s / 4) = init_std
            else:
                s0 = math.log(math.expm1(init_std))  # softplus(s) = init_std
            self.f_sigma[-1].bias.fill_(s0)

    def forward(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """``xi (N, C_in) -> (mu (N, D), sigma (N, D))``."""
        s = self.f_sigma(xi)
        sigma = torch.exp(0.25 * s) if self.official_compat else F.softplus(s)
        return self.f_mu(xi), sigma

    def sample(
        self,
        xi: Tensor,
        n_samples: int,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised draws ``z0 = mu + eps * sigma`` and ``log q0(z0)``.

        Args:
            xi: ``(N, C_in)``.
            n_samples: R.
            generator: source of the per-row seeds of ``eps``
                (:func:`pfl.method.sampling.draw_seeds`); ``None`` uses torch's global RNG.
            eps: ``(R, N, D)`` standard-normal noise to use instead of drawing it.

        Returns:
            ``z0 (R, N, D)``, ``log_q0 (R, N)``.
        """
        z0, log_q0, _, _ = self._sample(xi, n_samples, generator, eps)
        return z0, log_q0

    def _sample(self, xi, n_samples, generator, eps):
        mu, sigma = self(xi)
        if eps is None:
            seeds = draw_seeds(xi.shape[0], generator)
            eps = draw_noise(seeds, (n_samples, self.dim), dtype=xi.dtype,
                             device=xi.device).transpose(0, 1)
        elif eps.shape != (n_samples, *mu.shape):
            raise ValueError(
                f"eps has shape {tuple(eps.shape)}; expected (R, N, D) = {(n_samples, *mu.shape)}"
            )
        z0 = mu + eps * sigma
        # log q0 from eps directly: exact even when sigma is tiny.
        log_q0 = (-0.5 * eps * eps - torch.log(sigma) - 0.5 * _LOG_2PI).sum(-1)
        return z0, log_q0, mu, sigma


@dataclass
class FlowSample:
    """What a :class:`PromptFlow` returns for ``xi (N, C_in)`` and R samples.

    Attributes:
        z: ``(R, N, D)`` samples ``z_K`` (the prompt offsets).
        loss: ``(N,)`` flow loss per conditioning vector: the R-sample mean of
            ``log q0(z0) - sum_k log|det_k| - log N(z_K; 0, I)`` (appendix Eq. A.1's first two
            terms, a Monte Carlo estimate of ``KL(q_K || N(0, I))``); for ``gaussian`` the
            closed-form ``KL(q0 || N(0, I))`` (Eq. A.5).
        log_q: ``(R, N)`` ``log q_K(z_K) = log q0(z0) - sum_k log|det_k|`` (exact only for an
            invertible flow); lets a caller use another target, e.g. reverse KL to a toy
            density.
        mu, sigma: ``(N, D)`` mean and standard deviation of ``q0``.
    """

    z: Tensor
    loss: Tensor
    log_q: Tensor
    mu: Tensor
    sigma: Tensor


class PromptFlow(nn.Module):
    """q0 from :class:`GaussianEncoder`, then K planar steps (docs/reproduction.md, "Prompt flow").

    ``amortised=True`` (ISD): ``u, w (K, D)`` and ``b (K,)`` come from ``xi`` through Linear
    layers, one set per image. ``amortised=False`` (IAD): ``u, w, b`` are free parameters
    shared by all inputs. ``flow_type="gaussian"`` drops the steps (appendix Eq. A.5).

    Args:
        dim: D, width of a sample (the text token embedding width).
        cond_dim: C_in, width of ``xi`` (global image feature, or the IAD state vector).
        hidden: width of ``f_mu``/``f_sigma``; ``None``: ``cond_dim`` (the joint width C).
        n_steps: K (paper: 10).
        flow_type: ``"planar"`` (paper) | ``"gaussian"`` (Eq. A.5 ablation).
        invertible: ``u_hat`` reparameterisation (``w^T u > -1``); paper and code: ``False``.
        amortised: ``True`` ISD, ``False`` IAD.
        official_compat: the authors' ``sigma = exp(s / 4)`` (see :class:`GaussianEncoder`).
        init_std: ``sigma`` of q0 at init.
        encoder: an existing :class:`GaussianEncoder` to use or share (the two IAD flows share
            one).
        prior_std: the prior of the flow loss is ``N(0, prior_std^2 I)``; the paper's is
            ``N(0, I)`` (1.0). The samples are added to token embeddings of std ~0.02, so with
            ``N(0, I)`` the loss pulls every offset toward a scale 50 times that of the
            tokens (README, "Measured": it holds L_ort at 1 on the smoke profile).
        generator: source of every init draw (None: torch's global RNG); the encoder (when
            built here) draws first, so it does not depend on ``flow_type``.

    Note:
        Init: the learnable ``u`` and ``b`` are 0 (amortised: zero u and b heads), so each
        step starts as the identity and ``q_K = q0`` with ``sigma = init_std``. For
        ``invertible=True`` the ``u`` handed to :func:`planar_step` is
        ``u + log(e - 1) w / ||w||^2``: then ``w^T u = log(e - 1)``, where
        ``m(w^T u) = 0``, so ``u_hat = 0`` at init too (without the shift ``u_hat`` would
        start at ``-0.31 w / ||w||^2``, a contraction by 0.31 along ``w`` at every step). The
        shift is a bijection of ``u``: the family of flows is unchanged. Free ``w`` is
        ``N(0, 1/D)`` per entry (norm ~1); the amortised w head keeps torch's default init.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        hidden: int | None = None,
        n_steps: int = 10,
        flow_type: str = "planar",
        invertible: bool = False,
        amortised: bool = True,
        official_compat: bool = False,
        init_std: float = 0.02,
        encoder: GaussianEncoder | None = None,
        generator: torch.Generator | None = None,
        prior_std: float = 1.0,
    ) -> None:
        super().__init__()
        if prior_std <= 0:
            raise ValueError(f"PromptFlow: prior_std must be > 0, got {prior_std}")
        self.prior_std = float(prior_std)
        if flow_type not in FLOW_TYPES:
            raise ValueError(f"flow_type must be one of {FLOW_TYPES}, got {flow_type!r}")
        if n_steps < 0:
            raise ValueError(f"n_steps (K) must be >= 0, got {n_steps}")
        self.dim, self.cond_dim = dim, cond_dim
        self.flow_type, self.invertible, self.amortised = flow_type, invertible, amortised
        self.n_steps = n_steps if flow_type == "planar" else 0
        if encoder is None:
            encoder = GaussianEncoder(cond_dim, dim, hidden, official_compat, init_std,
                                      generator)
        elif encoder.dim != dim:
            raise ValueError(f"shared encoder has dim {encoder.dim}, this flow needs {dim}")
        self.encoder = encoder
        K = self.n_steps
        if amortised and K > 0:
            self.u_head = _linear(cond_dim, K * dim, generator)
            self.w_head = _linear(cond_dim, K * dim, generator)
            self.b_head = _linear(cond_dim, K, generator)
            for head in (self.u_head, self.b_head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        elif not amortised:
            self.u = nn.Parameter(torch.zeros(K, dim))
            self.w = nn.Parameter(torch.randn(K, dim, generator=generator) / math.sqrt(dim))
            self.b = nn.Parameter(torch.zeros(K))

    @classmethod
    def from_config(cls, cfg, dim: int, cond_dim: int, amortised: bool, **kw) -> PromptFlow:
        """Build from a :class:`pfl.config.ModelConfig` (K, flow_type, invertible, ...)."""
        return cls(
            dim=dim,
            cond_dim=cond_dim,
            hidden=cfg.mlp_hidden,
            n_steps=cfg.flow_length,
            flow_type=cfg.flow_type,
            invertible=cfg.invertible,
            amortised=amortised,
            official_compat=cfg.official_compat,
            prior_std=cfg.prior_std,
            **kw,
        )

    def flow_params(self, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``u, w, b`` for :func:`planar_flow`: amortised ``(K, N, D), (K, N, D), (K, N)``;
        free ``(K, D), (K, D), (K,)``. With ``invertible`` ``u`` includes the init shift."""
        n, K, D = xi.shape[0], self.n_steps, self.dim
        if not self.amortised:
            u, w, b = self.u, self.w, self.b
        elif K == 0:  # no heads were built (an empty Linear warns at init)
            return xi.new_zeros(0, n, D), xi.new_zeros(0, n, D), xi.new_zeros(0, n)
        else:
            u = self.u_head(xi).view(n, K, D).transpose(0, 1)
            w = self.w_head(xi).view(n, K, D).transpose(0, 1)
            b = self.b_head(xi).transpose(0, 1)
        if self.invertible:
            w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            u = u + _U_HAT_ZERO * w / w_sq
        return u, w, b

    def forward(
        self,
        xi: Tensor,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
        log_det_scale: float = 1.0,
    ) -> FlowSample:
        """Draw R samples per conditioning vector and the flow loss (Algorithm 1; Eq. A.1).

        Args:
            xi: ``(N, C_in)`` conditioning vectors.
            n_samples: R (1 in training, 10 at inference).
            generator: source of the per-image seeds of the noise
                (:func:`pfl.method.sampling.draw_noise`).
            eps: ``(R, N, D)`` noise to use instead of drawing it.
            log_det_scale: factor on ``sum_k log|det_k|`` in the loss only (1: Eq. A.1). The
                authors' IAD loss divides it by the batch size (``ModelConfig.
                iad_logdet_per_batch``); ``z`` and ``log_q`` do not change.
        """
        if xi.dim() != 2 or xi.shape[1] != self.cond_dim:
            raise ValueError(
                f"PromptFlow expects xi of shape (N, {self.cond_dim}), got {tuple(xi.shape)}"
            )
        z0, log_q0, mu, sigma = self.encoder._sample(xi, n_samples, generator, eps)
        if self.flow_type == "gaussian":
            return FlowSample(z0, gaussian_kl_to_std_normal(mu, sigma, self.prior_std), log_q0,
                              mu, sigma)
        u, w, b = self.flow_params(xi)
        z, sum_log_det = planar_flow(z0, u, w, b, invertible=self.invertible)
        log_q = log_q0 - sum_log_det
        loss = (log_q0 - log_det_scale * sum_log_det
                - std_normal_log_prob(z, self.prior_std)).mean(0)
        return FlowSample(z, loss, log_q, mu, sigma)


def fit_reverse_kl(
    flow: PromptFlow,
    log_target: Callable[[Tensor], Tensor],
    xi: Tensor,
    steps: int = 300,
    batch: int = 256,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
    schedule: str = "cosine",
) -> list[float]:
    """Fit ``flow`` to an unnormalised density by reverse KL; returns the loss per step.

    Loss: ``E_q0[log q0(z0) - sum_k log|det_k| - log p~(z_K)]`` = ``KL(q_K || p) - log Z``,
    the prompt-flow loss with ``N(0, I)`` replaced by the target ``p~`` (notebook 03).

    Args:
        flow: the flow to train in place (Adam).
        log_target: ``(..., D) -> (...)`` unnormalised log density.
        xi: ``(1, C_in)`` conditioning vector.
        steps, batch, lr: Adam steps, samples R per step, learning rate.
        generator: source of every draw.
        schedule: ``"cosine"`` (default) decays the learning rate to 0 over ``steps``;
            ``"constant"`` keeps it. With a constant lr 2e-2 the 200-step fit of a ring is
            chaotic: a 1e-12 nudge of the initial weights moves the final KL by 5e-2 at K = 10
            (two CPUs' last-bit differences land it in different optima); with the cosine
            decay the same nudge moves no KL of notebook 03's table by more than 7e-6.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for step in range(steps):
        if schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
        out = flow(xi, n_samples=batch, generator=generator)
        loss = (out.log_q - log_target(out.z)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history
