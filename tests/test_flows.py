"""Tests of pfl.method.flows: log-dets against autograd Jacobians, u-hat, q0, KL, vectorisation."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Normal, kl_divergence

from pfl import config
from pfl.method.flows import (
    GaussianEncoder,
    PromptFlow,
    fit_reverse_kl,
    gaussian_kl_to_std_normal,
    invertible_u,
    planar_flow,
    planar_step,
    std_normal_log_prob,
)
from pfl.method.sampling import draw_noise, draw_seeds

D = 5


def _params(g, K=None, scale=1.5):
    shape = (D,) if K is None else (K, D)
    u = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    b = torch.randn(shape[:-1], generator=g, dtype=torch.float64)
    return u, w, b


@pytest.mark.parametrize("invertible", [False, True])
def test_single_step_logdet_matches_autograd_jacobian(invertible):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        u, w, b = _params(g)
        z = torch.randn(D, generator=g, dtype=torch.float64)
        _, log_det = planar_step(z, u, w, b, invertible=invertible)
        J = jacobian(lambda x, u=u, w=w, b=b: planar_step(x, u, w, b, invertible)[0], z)
        ref = torch.linalg.slogdet(J).logabsdet
        assert abs(float(log_det - ref)) < 1e-8


@pytest.mark.parametrize("invertible", [False, True])
def test_k_stack_logdet_matches_autograd_jacobian(invertible):
    g = torch.Generator().manual_seed(2)
    for K in (1, 3, 10):
        u, w, b = _params(g, K=K, scale=0.8)
        z0 = torch.randn(D, generator=g, dtype=torch.float64)
        _, sum_log_det = planar_flow(z0, u, w, b, invertible=invertible)
        J = jacobian(lambda x, u=u, w=w, b=b: planar_flow(x, u, w, b, invertible)[0], z0)
        ref = torch.linalg.slogdet(J).logabsdet
        assert abs(float(sum_log_det - ref)) < 1e-8


def test_step_matches_formula_on_hand_values():
    z = torch.tensor([1.0, 2.0], dtype=torch.float64)
    u = torch.tensor([0.5, -1.0], dtype=torch.float64)
    w = torch.tensor([0.3, 0.1], dtype=torch.float64)
    b = torch.tensor(0.2, dtype=torch.float64)
    h = math.tanh(0.3 + 0.2 + 0.2)
    z_new, log_det = planar_step(z, u, w, b)
    assert torch.allclose(z_new, torch.tensor([1 + 0.5 * h, 2 - h], dtype=torch.float64))
    assert abs(float(log_det) - math.log(abs(1 + (1 - h * h) * (0.15 - 0.1)))) < 1e-14


def test_u_hat_satisfies_invertibility_condition():
    g = torch.Generator().manual_seed(3)
    # w^T u ~ N(0, 16): beyond -30 (where e^{w^T u} = m + 1 drops below float64 rounding of
    # w^T u_hat, see invertible_u) lies ~7 standard deviations out
    u = torch.randn(10000, 16, generator=g, dtype=torch.float64)
    w = torch.randn(10000, 16, generator=g, dtype=torch.float64)
    u_hat = invertible_u(u, w)
    wu, wu_hat = (w * u).sum(-1), (w * u_hat).sum(-1)
    assert bool((wu_hat > -1).all())
    assert torch.allclose(wu_hat, torch.nn.functional.softplus(wu) - 1, atol=1e-12)
    # some raw draws violate it, so the test can fail if u_hat were the identity
    assert int((wu <= -1).sum()) > 1000
    # u_hat only moves u along w
    perp = u_hat - u
    cos = torch.nn.functional.cosine_similarity(perp, w, dim=-1).abs()
    assert bool((cos[perp.norm(dim=-1) > 1e-9] > 1 - 1e-9).all())


def test_non_invertible_step_gives_finite_logdet_at_singular_point():
    # w^T u = -1 and h = 0 make 1 + u^T psi = 0 exactly
    z = torch.zeros(2, dtype=torch.float64)
    u, w = (
        torch.tensor([-1.0, 0.0], dtype=torch.float64),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
    )
    _, log_det = planar_step(z, u, w, torch.tensor(0.0, dtype=torch.float64))
    assert torch.isfinite(log_det) and float(log_det) < -700


def test_encoder_log_q0_matches_torch_normal():
    g = torch.Generator().manual_seed(4)
    for compat in (False, True):
        enc = GaussianEncoder(6, D, hidden=7, official_compat=compat, init_std=0.3).double()
        for p in enc.parameters():  # move off the init so mu, sigma vary with xi
            p.data.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        xi = torch.randn(3, 6, generator=g, dtype=torch.float64)
        z0, log_q0 = enc.sample(xi, 4, generator=g)
        mu, sigma = enc(xi)
        assert z0.shape == (4, 3, D) and log_q0.shape == (4, 3)
        ref = Normal(mu, sigma).log_prob(z0).sum(-1)
        assert torch.allclose(log_q0, ref, atol=1e-10)
        s = enc.f_sigma(xi)
        expected = torch.exp(0.25 * s) if compat else torch.nn.functional.softplus(s)
        assert torch.allclose(sigma, expected)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("invertible", [False, True])
@pytest.mark.parametrize("amortised", [False, True])
def test_init_is_identity_flow_with_small_samples(compat, invertible, amortised):
    torch.manual_seed(0)
    flow = PromptFlow(
        64,
        32,
        n_steps=10,
        official_compat=compat,
        invertible=invertible,
        amortised=amortised,
        init_std=0.02,
    )
    xi = torch.randn(4, 32)
    mu, sigma = flow.encoder(xi)
    assert torch.allclose(mu, torch.zeros_like(mu))
    assert torch.allclose(sigma, torch.full_like(sigma, 0.02))
    eps = draw_noise(draw_seeds(4, torch.Generator().manual_seed(0)), (10, 64)).transpose(0, 1)
    out = flow(xi, 10, eps=eps)
    # every step starts as the identity (u_hat = 0 for the invertible variant too): z_K = z0
    assert torch.allclose(out.z, 0.02 * eps, atol=1e-6)


def test_gaussian_variant_loss_is_closed_form_kl():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    flow = PromptFlow(D, 6, n_steps=10, flow_type="gaussian", init_std=0.7).double()
    for p in flow.parameters():
        p.data.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    xi = torch.randn(3, 6, generator=g, dtype=torch.float64)
    out = flow(xi, 2, generator=g)
    ref = kl_divergence(Normal(out.mu, out.sigma), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(out.loss, ref, atol=1e-12)
    assert torch.allclose(gaussian_kl_to_std_normal(out.mu, out.sigma), ref, atol=1e-12)


def test_planar_with_zero_steps_is_single_sample_kl_estimate():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    flow = PromptFlow(D, 6, n_steps=0, init_std=0.7).double()
    for p in flow.parameters():
        p.data.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    xi = torch.randn(2, 6, generator=g, dtype=torch.float64)
    out = flow(xi, 1, generator=g)
    direct = Normal(out.mu, out.sigma).log_prob(out.z[0]).sum(-1) - std_normal_log_prob(out.z[0])
    assert torch.allclose(out.loss, direct, atol=1e-10)
    many = flow(xi, 200_000, generator=g)
    kl = gaussian_kl_to_std_normal(many.mu, many.sigma)
    # Monte Carlo standard error of the mean at R = 2e5 is ~0.003 here; allow 5 sigma
    se = (many.log_q - std_normal_log_prob(many.z)).std(0) / math.sqrt(200_000)
    assert torch.all((many.loss - kl).abs() < 5 * se + 1e-9)


@pytest.mark.parametrize("amortised", [True, False])
@pytest.mark.parametrize("invertible", [False, True])
def test_vectorised_flow_equals_python_loop(amortised, invertible):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    flow = PromptFlow(D, 6, n_steps=4, invertible=invertible, amortised=amortised, init_std=0.5)
    flow = flow.double()
    for p in flow.parameters():
        p.data.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    R, N = 3, 4
    xi = torch.randn(N, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(R, N, D, generator=g, dtype=torch.float64)
    out = flow(xi, R, eps=eps)
    mu, sigma = flow.encoder(xi)
    for n in range(N):
        loss_n = 0.0
        for r in range(R):
            z = mu[n] + eps[r, n] * sigma[n]
            log_q = Normal(mu[n], sigma[n]).log_prob(z).sum()
            for k in range(4):
                if amortised:
                    u = flow.u_head(xi[n]).view(4, D)[k]
                    w = flow.w_head(xi[n]).view(4, D)[k]
                    b = flow.b_head(xi[n])[k]
                else:
                    u, w, b = flow.u[k], flow.w[k], flow.b[k]
                if invertible:  # the init shift, see PromptFlow's Note
                    u = u + math.log(math.e - 1) * w / (w @ w)
                z, log_det = planar_step(z, u, w, b, invertible=invertible)
                log_q = log_q - log_det
            assert torch.allclose(out.z[r, n], z, atol=1e-12)
            assert torch.allclose(out.log_q[r, n], log_q, atol=1e-10)
            loss_n = loss_n + (log_q - std_normal_log_prob(z)) / R
        assert torch.allclose(out.loss[n], loss_n, atol=1e-10)


def test_generator_reproducibility_and_batch_order():
    torch.manual_seed(8)
    flow = PromptFlow(D, 6, n_steps=3)
    xi = torch.randn(4, 6)
    a = flow(xi, 5, generator=torch.Generator().manual_seed(42)).z
    b = flow(xi, 5, generator=torch.Generator().manual_seed(42)).z
    c = flow(xi, 5, generator=torch.Generator().manual_seed(43)).z
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the first image alone draws what it draws at the head of a batch
    alone = flow(xi[:1], 5, generator=torch.Generator().manual_seed(42)).z
    assert torch.allclose(alone[:, 0], a[:, 0], atol=1e-7)  # BLAS may differ in the last bit
    eps = draw_noise(draw_seeds(4, torch.Generator().manual_seed(0)), (5, D)).transpose(0, 1)
    assert eps.shape == (5, 4, D)
    alone = draw_noise(draw_seeds(1, torch.Generator().manual_seed(0)), (5, D)).transpose(0, 1)
    assert torch.equal(eps[:, :1], alone)


def test_draw_noise_is_standard_normal():
    from scipy import stats

    eps = draw_noise(draw_seeds(50, torch.Generator().manual_seed(0)), (40, 100),
                     dtype=torch.float64).transpose(0, 1)
    x = eps.flatten().numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1) < 0.01
    # neighbouring coordinates are uncorrelated (2e5 pairs: standard error ~0.002)
    rows = eps.reshape(-1, 100)
    pairs = torch.stack([rows[:, :-1].flatten(), rows[:, 1:].flatten()])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.01


def test_gradients_reach_every_parameter():
    torch.manual_seed(9)
    for amortised in (True, False):
        flow = PromptFlow(D, 6, n_steps=3, amortised=amortised)
        with torch.no_grad():  # leave the zero init so that w and b get gradients too
            for p in flow.parameters():
                p.add_(0.1 * torch.randn_like(p))
        flow(torch.randn(2, 6), 2, generator=torch.Generator().manual_seed(0)).loss.sum().backward()
        for name, p in flow.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_shared_encoder_from_config_and_bad_input():
    cfg = config.smoke().model
    enc = GaussianEncoder(6, D)
    normal = PromptFlow.from_config(cfg, dim=D, cond_dim=6, amortised=False, encoder=enc)
    abnormal = PromptFlow.from_config(cfg, dim=D, cond_dim=6, amortised=False, encoder=enc)
    assert normal.encoder is abnormal.encoder and normal.n_steps == cfg.flow_length
    with pytest.raises(ValueError, match="xi of shape"):
        normal(torch.randn(6))
    with pytest.raises(ValueError, match="flow_type"):
        PromptFlow(D, 6, flow_type="radial")


def test_reverse_kl_fit_moves_q_toward_target():
    # target N(m, s^2 I): the planar flow (K=0) is Gaussian, so it can match exactly
    m, s = torch.tensor([1.5, -1.0]), 0.5

    def log_target(z):
        return Normal(m, s).log_prob(z).sum(-1)

    torch.manual_seed(10)
    flow = PromptFlow(2, 1, hidden=8, n_steps=2, amortised=False, init_std=1.0, invertible=True)
    hist = fit_reverse_kl(
        flow,
        log_target,
        torch.ones(1, 1),
        steps=300,
        batch=128,
        lr=2e-2,
        generator=torch.Generator().manual_seed(0),
    )
    assert hist[-1] < 0.1 < hist[0]  # KL(q || p) (normalised target) from > 1 to ~0


def test_scaled_prior_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(3)
    z = 0.05 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    for s in (1.0, 0.02):
        want = Normal(torch.zeros(6, dtype=torch.float64), s).log_prob(z).sum(-1)
        assert torch.allclose(std_normal_log_prob(z, s), want, atol=1e-10)
        mu = 0.03 * torch.randn(6, generator=g, dtype=torch.float64)
        std = 0.01 + 0.02 * torch.rand(6, generator=g, dtype=torch.float64)
        want_kl = torch.distributions.kl_divergence(
            Normal(mu, std), Normal(torch.zeros(6, dtype=torch.float64), s)).sum()
        assert torch.allclose(gaussian_kl_to_std_normal(mu, std, s), want_kl, atol=1e-10)


def test_prior_std_sets_the_flow_loss_prior_and_is_validated():
    torch.manual_seed(0)
    xi = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    for flow_type in ("planar", "gaussian"):
        a = PromptFlow(5, 4, n_steps=2, flow_type=flow_type,
                       generator=torch.Generator().manual_seed(0))
        b = PromptFlow(5, 4, n_steps=2, flow_type=flow_type, prior_std=0.02,
                       generator=torch.Generator().manual_seed(0))
        oa, ob = a(xi, 2, eps=eps), b(xi, 2, eps=eps)
        assert torch.equal(oa.z, ob.z)  # the prior changes the loss only
        if flow_type == "planar":
            want = (ob.log_q - Normal(0.0, 0.02).log_prob(ob.z).sum(-1)).mean(0)
        else:
            want = torch.distributions.kl_divergence(Normal(ob.mu, ob.sigma),
                                                     Normal(0.0, 0.02)).sum(-1)
        assert torch.allclose(ob.loss, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="prior_std"):
        PromptFlow(5, 4, prior_std=0.0)


def test_reverse_kl_schedule_cosine_ends_near_zero_and_unknown_is_refused(monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    flow = PromptFlow(2, 1, hidden=4, n_steps=1, amortised=False, init_std=1.0)
    fit_reverse_kl(flow, lambda z: -0.5 * (z * z).sum(-1), torch.ones(1, 1), steps=10, batch=4,
                   lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert seen[0] == pytest.approx(1e-2) and seen[-1] < 1e-3 and seen == sorted(seen)[::-1]
    with pytest.raises(ValueError, match="schedule"):
        fit_reverse_kl(flow, lambda z: z.sum(-1), torch.ones(1, 1), steps=1, schedule="linear")


def test_generator_init_leaves_the_global_rng_alone_and_keeps_the_encoder():
    # with a generator every init draw comes from it: the global stream is not consumed, and
    # the encoder (drawn first) is the same whether or not planar heads follow
    torch.manual_seed(11)
    before = torch.get_rng_state()
    planar = PromptFlow(D, 6, n_steps=3, generator=torch.Generator().manual_seed(1))
    gauss = PromptFlow(D, 6, n_steps=3, flow_type="gaussian",
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    for (name, a), (_, b) in zip(planar.encoder.state_dict().items(),
                                 gauss.encoder.state_dict().items()):
        assert torch.equal(a, b), name
    other = PromptFlow(D, 6, n_steps=3, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other.encoder.f_mu[0].weight, planar.encoder.f_mu[0].weight)
