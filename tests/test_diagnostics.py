"""pfl.method.diagnostics (the posterior's state, issue #16) against slow references written here,
and its tracking in pfl.run.train.fit: same weights with it on or off, resumable history."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image_features

from pfl.config import ModelConfig, TrainConfig
from pfl.method.diagnostics import KEYS, posterior_diagnostics
from pfl.method.model import BayesPFL
from pfl.method.sampling import draw_noise, feature_keys, image_seeds
from pfl.run.features import FeatureStore
from pfl.run.train import History, diagnostics_batch, fit

CFG = ModelConfig(n_prompts=3, n_ctx=2, n_state=2, flow_length=3, mc_train=1, mc_test=4)
NAMES = ["bottle", "pcb1", "bottle"]
R = 4


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def feats(tiny_backbone):
    return random_image_features(tiny_backbone, 3)


def perturbed(backbone, seed: int = 1) -> BayesPFL:
    """A model away from its init (there ``mu = 0``, ``u = 0``: the flows are the identity)."""
    model = BayesPFL(backbone, CFG, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() > 0 and not name.startswith("backbone."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return perturbed(tiny_backbone)


@pytest.fixture(scope="module")
def diag(model, feats):
    return posterior_diagnostics(model, feats, NAMES, n_samples=R, seed=7)


def _mlp(seq, x):  # the f_mu / f_sigma stack, layer by layer
    for layer in seq:
        x = layer(x)
    return x


def _pop_std(x: torch.Tensor) -> torch.Tensor:
    """Population std over dim 0 by its definition."""
    return ((x - x.mean(0)) ** 2).mean(0).sqrt()


def test_q0_and_flow_spread_match_hand_references(model, feats, diag):
    assert list(diag) == list(KEYS)
    with torch.no_grad():
        xi = {"isd": F.normalize(feats.global_, dim=-1),
              "normal": model.iad_state[0:1], "abnormal": model.iad_state[1:2]}
        enc = {"isd": model.isd.encoder, "normal": model.iad_encoder,
               "abnormal": model.iad_encoder}
        flows = {"isd": model.isd, "normal": model.iad_normal, "abnormal": model.iad_abnormal}
        D = model.backbone.text_width
        # forward_features' noise, rebuilt: image n, block (ISD, IAD normal, IAD abnormal)
        noise = draw_noise(image_seeds(7, feature_keys(feats)), (3, R, D))  # (N, 3, R, D)
        for k, name in enumerate(("isd", "normal", "abnormal")):
            mu = _mlp(enc[name].f_mu, xi[name])
            sigma = F.softplus(_mlp(enc[name].f_sigma, xi[name]))
            rows = xi[name].expand(len(NAMES), -1)
            mu_norm = torch.stack([mu[min(n, len(mu) - 1)].pow(2).sum().sqrt()
                                   for n in range(len(NAMES))]).mean()
            assert diag[f"{name}_mu"] == pytest.approx(float(mu_norm), rel=1e-5)
            assert diag[f"{name}_sigma"] == pytest.approx(float(sigma.mean()), rel=1e-5)
            # one flow call per sample r, then the spread over r
            z = torch.stack([flows[name](rows, 1, eps=noise[:, k, r][None]).z[0]
                             for r in range(R)])  # (R, N, D)
            assert diag[f"{name}_z_std"] == pytest.approx(float(_pop_std(z).mean()), rel=1e-5)
    assert diag["isd_mu"] > 0 and diag["isd_z_std"] > 0  # the references are not all zero


def test_text_measures_match_pairwise_loops(model, feats, diag):
    model.eval()
    with torch.no_grad():
        text = model.forward_features(feats, NAMES, seed=7, n_samples=R).text_features
    N, B = text.shape[:2]
    cos2, dist = [], {0: [], 1: []}
    for n in range(N):
        for r in range(R):
            for s in (0, 1):
                for i in range(B):
                    for j in range(B):
                        if i != j:
                            c = F.cosine_similarity(text[n, i, r, s], text[n, j, r, s], dim=0)
                            cos2.append(float(c) ** 2)
                            dist[s].append(1.0 - float(c))
    assert diag["ort"] == pytest.approx(sum(cos2) / len(cos2), rel=1e-5)
    assert diag["dist_normal"] == pytest.approx(sum(dist[0]) / len(dist[0]), rel=1e-5, abs=1e-7)
    assert diag["dist_abnormal"] == pytest.approx(sum(dist[1]) / len(dist[1]), rel=1e-5, abs=1e-7)
    assert 0 < diag["dist_normal"] and 0 < diag["ort"] < 1


def test_map_spread_is_the_std_of_the_per_sample_maps(model, feats, diag):
    model.eval()
    with torch.no_grad():
        maps = model.forward_features(feats, NAMES, seed=7, n_samples=R,
                                      sample_maps=True).sample_maps  # (N, R, S, S)
    want = _pop_std(maps.transpose(0, 1)).mean()
    assert diag["map_std"] == pytest.approx(float(want), rel=1e-4)
    assert diag["map_std"] > 0


SPREADS = ("isd_z_std", "normal_z_std", "abnormal_z_std", "map_std")


def test_one_sample_or_no_noise_gives_no_spread(model, feats, diag):
    one = posterior_diagnostics(model, feats, NAMES, n_samples=1, seed=7)
    still = posterior_diagnostics(model, feats, NAMES, n_samples=R, seed=7, noise_scale=0.0)
    for key in SPREADS:
        assert one[key] == 0.0, key
        assert still[key] == pytest.approx(0.0, abs=1e-6), key
        assert diag[key] > 1e-4, key  # with R draws of noise it is not
    for key in ("isd_mu", "isd_sigma", "normal_mu", "abnormal_sigma"):  # q0 does not depend on R
        assert one[key] == still[key] == diag[key], key


def test_identical_prompts_have_no_distance_and_full_ort(tiny_backbone, feats):
    """B equal bank prompts get the same offsets, so equal text features: every cosine is 1,
    hence distance 1 - 1 = 0 and L_ort = mean cos^2 = 1."""
    model = perturbed(tiny_backbone)
    with torch.no_grad():
        for p in (model.bank.context, model.bank.normal, model.bank.abnormal):
            p.copy_(p[:1].expand_as(p))
    d = posterior_diagnostics(model, feats, NAMES, n_samples=2, seed=7)
    assert d["ort"] == pytest.approx(1.0, abs=1e-5)
    assert d["dist_normal"] == pytest.approx(0.0, abs=1e-5)
    assert d["dist_abnormal"] == pytest.approx(0.0, abs=1e-5)


def test_restores_the_mode_and_leaves_the_global_rng(model, feats):
    model.train()
    state = torch.random.get_rng_state()
    posterior_diagnostics(model, feats, NAMES, n_samples=2, seed=7)
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    model.eval()
    posterior_diagnostics(model, feats, NAMES, n_samples=2, seed=7)
    assert not model.training


# --------------------------------------------------------------------------- tracking in fit

TRAIN = TrainConfig(epochs=3, batch_size=3, lr=1e-2, seed=5)  # 2 steps per epoch


@pytest.fixture(scope="module")
def store(tiny_backbone):
    S = tiny_backbone.image_size
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, S, S, generator=g)
    masks = torch.zeros(6, S, S)
    masks[1::2, 30:70, 20:60] = 1
    with torch.no_grad():
        f = tiny_backbone.encode_image(images)
    return FeatureStore(f, masks=masks.to(torch.uint8), labels=torch.tensor([0, 1] * 3),
                        cls_names=["bottle", "bottle", "pcb1", "pcb1", "wood", "wood"],
                        paths=[f"img{i}.png" for i in range(6)])


def _state(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_training_with_tracking_gives_the_same_weights(tiny_backbone, store, tmp_path):
    off = BayesPFL(tiny_backbone, CFG, seed=0)
    h_off = fit(off, store, TRAIN, tmp_path / "off", progress=False)
    on = BayesPFL(tiny_backbone, CFG, seed=0)
    # every 3rd step: one in mid-epoch, so a step follows a tracked one within the epoch
    h_on = fit(on, store, TRAIN, tmp_path / "on", progress=False, diagnostics_every=3,
               diagnostics_images=4)
    a, b = _state(off), _state(on)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    post = [f"post/{k}" for k in KEYS]
    steps_on, steps_off = h_on.steps_frame(), h_off.steps_frame()
    assert not any(c.startswith("post/") for c in steps_off.columns)
    assert steps_on.drop(columns=post).equals(steps_off)  # the loss terms too
    tracked = steps_on.dropna(subset=post)
    assert tracked["step"].tolist() == [3, 6]
    assert steps_on.loc[steps_on["step"] % 3 != 0, post].isna().all().all()
    # what fit recorded is the function on its fixed batch after that step
    batch = diagnostics_batch(store, 4)
    assert batch.paths == ["img0.png", "img2.png", "img3.png", "img5.png"]
    want = posterior_diagnostics(on, batch.feats, batch.cls_names, seed=TRAIN.seed)
    last = tracked.iloc[-1]
    for k in KEYS:
        assert last[f"post/{k}"] == want[k], k
    assert History.load(tmp_path / "on").steps == h_on.steps  # saved with the history


def test_tracked_history_resumes(tiny_backbone, store, tmp_path):
    kw = dict(progress=False, diagnostics_every=1, diagnostics_images=2)
    ref = fit(BayesPFL(tiny_backbone, CFG, seed=0), store, TRAIN, tmp_path / "ref", **kw)

    def stop(history, row):
        raise Killed

    with pytest.raises(Killed):
        fit(BayesPFL(tiny_backbone, CFG, seed=0), store, TRAIN, tmp_path / "run",
            callbacks=[stop], **kw)
    resumed = fit(BayesPFL(tiny_backbone, CFG, seed=9), store, TRAIN, tmp_path / "run", **kw)
    assert resumed.steps == ref.steps
    assert all(not math.isnan(s["post/ort"]) for s in resumed.steps)


def test_tracking_asks_for_bayes_pfl_and_a_positive_count(tiny_backbone, store, tmp_path):
    from _toy import ToyMethod

    with pytest.raises(ValueError, match="BayesPFL"):
        fit(ToyMethod(), store, TRAIN, tmp_path / "toy", diagnostics_every=1)
    with pytest.raises(ValueError, match=">= 1"):
        fit(BayesPFL(tiny_backbone, CFG, seed=0), store, TRAIN, tmp_path / "neg",
            diagnostics_every=-1)
