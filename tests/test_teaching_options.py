"""The model options notebook 03b teaches with: per-sample maps, zero noise, RCA bypassed."""

import pytest
import torch
from conftest import random_image_features
from torch import nn

from pfl.config import ModelConfig
from pfl.method.maps import fused_maps
from pfl.method.model import BayesPFL

CFG = ModelConfig(n_prompts=2, n_ctx=3, n_state=3, flow_length=3, mc_test=4)
NAMES = ["bottle", "pcb1"]


@pytest.fixture(scope="module")
def model(tiny_backbone):
    m = BayesPFL(tiny_backbone, CFG, seed=0).eval()
    with torch.no_grad():  # non-zero flow steps and q0 mean, as after training
        for p in (m.isd.u_head.weight, m.iad_normal.u, m.iad_abnormal.u,
                  m.isd.encoder.f_mu[-1].bias):
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return m


@pytest.fixture(scope="module")
def feats(tiny_backbone):
    return random_image_features(tiny_backbone, 2)


def _run(model, feats, **kw):
    with torch.no_grad():
        return model.forward_features(feats, NAMES, seeds=[3, 4], **kw)


def test_sample_maps_average_to_the_anomaly_map_and_spread_to_map_std(model, feats):
    out = _run(model, feats, n_samples=4, map_std=True, sample_maps=True)
    S = model.backbone.image_size
    assert out.sample_maps.shape == (2, 4, S, S)
    torch.testing.assert_close(out.sample_maps.mean(1), out.anomaly_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sample_maps.std(1, correction=0), out.map_std,
                               atol=1e-6, rtol=0)
    assert float(out.map_std.max()) > 1e-4  # the samples differ: the test can fail
    assert _run(model, feats, n_samples=4).sample_maps is None


def test_sample_maps_alone_leave_map_std_unset(model, feats):
    out = _run(model, feats, n_samples=2, sample_maps=True)
    assert out.map_std is None and out.sample_maps.shape[1] == 2


def test_zero_noise_gives_one_deterministic_prompt(model, feats):
    one = _run(model, feats, n_samples=1, noise_scale=0.0)
    many = _run(model, feats, n_samples=4, noise_scale=0.0, map_std=True)
    torch.testing.assert_close(many.anomaly_map, one.anomaly_map, atol=1e-6, rtol=0)
    assert float(many.map_std.max()) < 1e-6
    # the prompt is the flow applied to q0's mean: same for any seed
    other = model.forward_features(feats, NAMES, seeds=[7, 8], n_samples=1, noise_scale=0.0)
    torch.testing.assert_close(other.anomaly_map.detach(), one.anomaly_map, atol=1e-6, rtol=0)
    noisy = _run(model, feats, n_samples=4)
    assert float((noisy.anomaly_map - many.anomaly_map).abs().max()) > 1e-5


class _Identity(nn.Module):
    def forward(self, text, patches):
        return text[:, None].expand(-1, patches.shape[1], -1, -1)


def test_use_rca_false_is_the_model_with_rca_removed(model, feats):
    off = _run(model, feats, use_rca=False)
    on = _run(model, feats)
    rca = model.rca
    try:
        model.rca = _Identity()
        removed = _run(model, feats)
    finally:
        model.rca = rca
    torch.testing.assert_close(off.anomaly_map, removed.anomaly_map, atol=1e-6, rtol=0)
    assert float((off.anomaly_map - on.anomaly_map).abs().max()) > 1e-5
    torch.testing.assert_close(off.score, on.score)  # RCA touches the pixel branch only


def test_keep_samples_needs_n_samples():
    with pytest.raises(ValueError, match="keep_samples needs n_samples"):
        fused_maps(torch.zeros(1, 1, 2, 3, 3), (6, 6), keep_samples=True)
