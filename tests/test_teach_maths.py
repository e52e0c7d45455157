"""The maths notebook 03b teaches, as tests: RCA by hand, the reparameterisation gradient, the
flow loss as a Monte Carlo KL, the nested Monte Carlo error law."""

import math

import torch
import torch.nn.functional as F

from pfl.method.flows import GaussianEncoder, PromptFlow, gaussian_kl_to_std_normal
from pfl.method.rca import RCA


def rca_by_hand(rca: RCA, text: torch.Tensor, patches: torch.Tensor, scale: float) -> torch.Tensor:
    """Notebook 03b's cell: per layer and head, softmax(q_h k_h^T * scale) k_h, + F_t, normalize.
    text (M, E), patches (L, T, E) -> (L, M, E)."""
    E, H = text.shape[-1], rca.heads
    dh = E // H
    q = text @ rca.query.weight.T + rca.query.bias
    out = []
    for layer in patches:
        heads = [torch.softmax(q[:, h * dh:(h + 1) * dh] @ layer[:, h * dh:(h + 1) * dh].T * scale,
                               dim=-1) @ layer[:, h * dh:(h + 1) * dh] for h in range(H)]
        refined = torch.cat(heads, -1) + text
        out.append(refined / refined.norm(dim=-1, keepdim=True))
    return torch.stack(out)


def test_rca_by_hand_uses_the_joint_width_scale():
    g = torch.Generator().manual_seed(0)
    E, M, L, T = 64, 6, 4, 49
    rca = RCA(E, 4).double()
    with torch.no_grad():  # a query large enough that the scale matters
        rca.query.weight.copy_(3 * torch.randn(E, E, generator=g, dtype=torch.float64))
    text = F.normalize(torch.randn(M, E, generator=g, dtype=torch.float64), dim=-1)
    patches = F.normalize(torch.randn(L, T, E, generator=g, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        lib = rca(text[None], patches[None])[0]
        hand = rca_by_hand(rca, text, patches, E ** -0.5)
        head_scale = rca_by_hand(rca, text, patches, (E // 4) ** -0.5)
    assert float((hand - lib).abs().max()) < 1e-12
    assert float((head_scale - lib).abs().max()) > 1e-3  # the head-width scale is another RCA


def test_reparameterised_gradient_equals_finite_differences():
    """d/d(theta) of a Monte Carlo estimate through GaussianEncoder.sample with fixed eps."""
    g = torch.Generator().manual_seed(1)
    enc = GaussianEncoder(3, 4, hidden=5, init_std=0.5, generator=g).double()
    xi = torch.randn(2, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 2, 4, generator=g, dtype=torch.float64)
    bias_mu, bias_s = enc.f_mu[-1].bias, enc.f_sigma[-1].bias

    def estimate() -> torch.Tensor:
        z0, log_q0 = enc.sample(xi, 8, eps=eps)
        return (torch.tanh(z0).pow(2).sum(-1) + log_q0).mean()

    grads = torch.autograd.grad(estimate(), (bias_mu, bias_s))
    h = 1e-6
    for param, grad in zip((bias_mu, bias_s), grads):
        fd = torch.zeros_like(param)
        with torch.no_grad():
            for i in range(param.numel()):
                param[i] += h
                up = estimate()
                param[i] -= 2 * h
                down = estimate()
                param[i] += h
                fd[i] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)
        assert float(grad.abs().max()) > 1e-3


def test_flow_loss_with_no_steps_is_a_monte_carlo_kl():
    flow = PromptFlow(dim=8, cond_dim=8, n_steps=0, init_std=0.4,
                      generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        flow.encoder.f_mu[-1].bias.fill_(0.3)
    xi = torch.ones(1, 8, dtype=torch.float64)
    R = 200_000
    with torch.no_grad():
        out = flow(xi, n_samples=R, generator=torch.Generator().manual_seed(3))
    exact = float(gaussian_kl_to_std_normal(out.mu, out.sigma)[0])
    per_sample_se = 4.0 / math.sqrt(R)  # the per-draw loss has std < 4 here
    assert abs(float(out.loss[0]) - exact) < 4 * per_sample_se
    assert exact > 1.0


def test_nested_monte_carlo_error_law():
    """E[(mean of first R - mean of all N)^2] = s^2 (1/R - 1/N), as notebook 03b predicts."""
    g = torch.Generator().manual_seed(4)
    N, trials = 20, 40_000
    x = torch.randn(trials, N, generator=g, dtype=torch.float64) * 0.3
    for R in (1, 5, 10, 20):
        err = ((x[:, :R].mean(1) - x.mean(1)) ** 2).mean()
        want = 0.09 * (1 / R - 1 / N)
        assert abs(float(err) - want) <= 0.05 * want + 1e-12
