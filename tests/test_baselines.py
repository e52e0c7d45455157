"""Peers (WinCLIP, APRIL-GAN, AnomalyCLIP): their mechanics against brute-force references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import adam_steps

from pfl.baselines import build
from pfl.baselines.anomalyclip import (
    AnomalyCLIP,
    encode_image_dpam,
    encode_text_deep,
    vv_attention,
)
from pfl.baselines.aprilgan import AprilGAN, AprilGANConfig, LayerAdapters
from pfl.baselines.winclip import (
    PromptEnsemble,
    WinCLIP,
    WinCLIPConfig,
    encode_windows,
    ensemble_prompts,
    harmonic_aggregation,
    window_indices,
    window_membership,
)
from pfl.clip.backbone import Backbone, create_clip
from pfl.config import BackboneConfig
from pfl.method.contract import Batch, Method


@pytest.fixture(scope="module")
def small_backbone() -> Backbone:
    """The tiny tower at 56 px: a 4 x 4 patch grid, cheap enough for per-window references."""
    return Backbone(create_clip(BackboneConfig(model_name="pfl-tiny", image_size=56)))


def _batch(bb: Backbone, names=("bottle", "screw"), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n, s = len(names), bb.image_size
    masks = torch.zeros(n, s, s)
    masks[-1, s // 4: s // 2, s // 4: s // 2] = 1.0
    return Batch(cls_names=list(names), images=torch.randn(n, 3, s, s, generator=g),
                 masks=masks, labels=torch.tensor([0] * (n - 1) + [1]))


# --- WinCLIP -----------------------------------------------------------------------------------
def test_harmonic_aggregation_hand_computed():
    # 3 x 3 grid, four 2 x 2 windows with scores 1/2, 1/4, 1, 1/5 (reciprocals 2, 4, 1, 5).
    member = window_membership(window_indices((3, 3), 2), 9)
    out = harmonic_aggregation(torch.tensor([[0.5, 0.25, 1.0, 0.2]]), member)
    expected = torch.tensor([[1 / 2, 2 / 6, 1 / 4,
                              2 / 3, 4 / 12, 2 / 9,
                              1.0, 2 / 6, 1 / 5]])
    assert torch.allclose(out, expected, atol=1e-7)


@pytest.mark.parametrize("grid,k,stride", [((5, 7), 3, 2), ((4, 4), 2, 1), ((6, 6), 4, 3)])
def test_windows_cover_every_patch_with_the_right_shape(grid, k, stride):
    win = window_indices(grid, k, stride)
    member = window_membership(win, grid[0] * grid[1])
    assert bool((member.sum(0) >= 1).all())
    rows, cols = win // grid[1], win % grid[1]
    assert bool(((rows.amax(1) - rows.amin(1)) == k - 1).all())
    assert bool(((cols.amax(1) - cols.amin(1)) == k - 1).all())
    assert member.sum(1).eq(k * k).all()


def _tower_on_tokens(bb: Backbone, image: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Reference: the CLS feature of the tower run on CLS + the kept patches alone (no padding)."""
    v = bb.clip.visual
    with torch.no_grad():
        x = v.conv1(image[None]).flatten(2).transpose(1, 2)[0] + v.positional_embedding[1:]
        seq = torch.cat([(v.class_embedding + v.positional_embedding[0])[None], x[keep]])[None]
        out = v.transformer(v.ln_pre(seq))
        return (v.ln_post(out[:, 0]) @ v.proj)[0]


@pytest.mark.parametrize("single_call", [True, False])
def test_batched_windows_equal_each_window_alone(small_backbone, single_call):
    bb = small_backbone
    images = _batch(bb).images
    windows = [window_indices(bb.grid, 2), window_indices(bb.grid, 3),
               torch.arange(16)[None]]  # the last "window" is the whole image
    # padded + masked in one call, or one call per size; chunking must not change anything
    feats = encode_windows(bb, images, windows, chunk=7, single_call=single_call)
    flat = torch.cat([F.pad(w, (0, 16 - w.shape[1]), value=-1) for w in windows])
    for i in range(images.shape[0]):
        for j, row in enumerate(flat):
            ref = _tower_on_tokens(bb, images[i], [t for t in row.tolist() if t >= 0])
            assert torch.allclose(feats[i, j], ref, atol=1e-5), (i, j)
    whole = bb.encode_image(images).global_
    assert torch.allclose(feats[:, -1], whole, atol=1e-5)


def test_winclip_map_equals_brute_force(small_backbone):
    """Grid map = harmonic mean over {global, 2x2, 3x3} of per-pixel harmonic window means."""
    bb = small_backbone
    batch = _batch(bb, names=("bottle",))
    method = WinCLIP(bb, WinCLIPConfig(prompts="sp", logit_scale=7.0))
    pred = method.predict(batch, torch.Generator())
    text = method.text.encode("bottle")
    diff = text[1] - text[0]

    def score(f):
        return float(torch.sigmoid(7.0 * F.normalize(f, dim=-1) @ diff))

    glob = score(bb.encode_image(batch.images).global_[0])
    window_score = {(k, r0, c0): score(_tower_on_tokens(
        bb, batch.images[0], [(r0 + i) * 4 + c0 + j for i in range(k) for j in range(k)]))
        for k in (2, 3) for r0 in range(5 - k) for c0 in range(5 - k)}
    ref = torch.zeros(16)
    for t in range(16):
        r, c = divmod(t, 4)
        per_scale = [glob]
        for k in (2, 3):
            inv = [1 / window_score[k, r0, c0] for r0 in range(5 - k) for c0 in range(5 - k)
                   if r0 <= r < r0 + k and c0 <= c < c0 + k]
            per_scale.append(len(inv) / sum(inv))
        ref[t] = len(per_scale) / sum(1 / s for s in per_scale)
    up = F.interpolate(ref.view(1, 1, 4, 4), size=(56, 56), mode="bilinear",
                       align_corners=False)[0, 0]
    assert torch.allclose(pred.maps[0], up, atol=1e-5)
    assert pred.scores[0].item() == pytest.approx(glob, abs=1e-6)


def test_winclip_needs_pixels(small_backbone):
    batch = _batch(small_backbone)
    feats = small_backbone.encode_image(batch.images)
    with pytest.raises(ValueError, match="needs images"):
        WinCLIP(small_backbone).predict(Batch(cls_names=batch.cls_names, feats=feats),
                                        torch.Generator())


# --- prompt ensemble and APRIL-GAN -------------------------------------------------------------
def test_prompt_ensemble_cache_equals_fresh_and_encodes_once(small_backbone, monkeypatch):
    ens = PromptEnsemble(small_backbone, "pe")
    first = ens(["bottle", "metal_nut", "bottle"])  # two classes, 264 prompts each
    calls = []
    fresh_encode = ens.encode
    monkeypatch.setattr(ens, "encode", lambda w: calls.append(w) or fresh_encode(w))
    again = ens(["metal_nut", "bottle"])
    assert calls == []  # served from the cache
    assert torch.equal(again[0], first[1]) and torch.equal(first[0], first[2])
    # fresh features, from scratch: the normalised mean of the normalised prompt features
    normal, abnormal = ensemble_prompts("metal nut", "pe")
    with torch.no_grad():
        ref = torch.stack([small_backbone.encode_text(p).mean(0) for p in (normal, abnormal)])
    assert torch.allclose(first[1], F.normalize(ref, dim=-1), atol=1e-6)
    assert not torch.allclose(PromptEnsemble(small_backbone, "sp")(["bottle"])[0], first[0])


def test_layer_adapters_equal_one_linear_per_layer():
    g = torch.Generator().manual_seed(3)
    ad = LayerAdapters(3, 8, 5, bias=True, generator=g)
    x = torch.randn(2, 3, 6, 8, generator=g)
    ref = torch.stack([F.linear(x[:, i], ad.weight[i], ad.bias[i]) for i in range(3)], 1)
    assert torch.allclose(ad(x), F.normalize(ref, dim=-1), atol=1e-6)


def test_aprilgan_map_is_mean_over_layers_of_two_way_softmax(small_backbone):
    bb = small_backbone
    batch = _batch(bb, names=("bottle", "bottle"))
    m = AprilGAN(bb, AprilGANConfig(train_prompts="sp", infer_prompts="pe", logit_scale=4.0),
                 generator=torch.Generator().manual_seed(0))
    pred = m.predict(batch, torch.Generator())
    feats = bb.encode_image(batch.images)
    text = PromptEnsemble(bb, "pe")(batch.cls_names)  # inference uses the PE text
    tok = m.adapters(feats.patches)  # (N, L, T, E)
    logits = 4.0 * torch.einsum("nlte,nke->nlkt", tok, text)  # both channels, then upsample
    n, n_layers = logits.shape[:2]
    up = F.interpolate(logits.reshape(n * n_layers, 2, 4, 4), size=(56, 56), mode="bilinear",
                       align_corners=False).softmax(1)[:, 1].reshape(n, n_layers, 56, 56)
    assert torch.allclose(pred.maps, up.mean(1), atol=1e-6)
    g = F.normalize(feats.global_, dim=-1)
    ref_score = (4.0 * torch.einsum("ne,nke->nk", g, text)).softmax(-1)[:, 1]
    assert torch.allclose(pred.scores, ref_score, atol=1e-6)
    # training reads the SP text, which differs from the PE text
    assert not torch.allclose(m.pixel_probs(batch, "sp"), m.pixel_probs(batch, "pe"))


# SP prompts where the ensemble is not the point: PE costs 264 text passes per class.
CHEAP = {"winclip": WinCLIPConfig(prompts="sp"),
         "aprilgan": AprilGANConfig(train_prompts="sp", infer_prompts="sp"),
         "anomalyclip": None}


@pytest.mark.parametrize("name", ["aprilgan", "anomalyclip"])
def test_training_lowers_the_loss_on_a_fixed_batch(small_backbone, name):
    batch = _batch(small_backbone)
    m = build(name, small_backbone, CHEAP[name], generator=torch.Generator().manual_seed(0))
    losses = adam_steps(m, batch, 20, 1e-3, torch.Generator().manual_seed(0))
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(not p.requires_grad for p in small_backbone.parameters())


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_every_peer_meets_the_contract_and_round_trips_its_state(small_backbone, name):
    m = build(name, small_backbone, CHEAP[name], generator=torch.Generator().manual_seed(1))
    assert isinstance(m, Method)
    state = m.trainable_state_dict()
    assert not any(k.startswith("backbone") for k in state)
    other = build(name, small_backbone, CHEAP[name], generator=torch.Generator().manual_seed(2))
    other.load_trainable_state_dict(state)
    batch = _batch(small_backbone)
    a, b = m.predict(batch, torch.Generator()), other.predict(batch, torch.Generator())
    assert a.maps.shape == (2, 56, 56) and a.scores.shape == (2,)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    assert float(a.maps.min()) >= 0.0 and float(a.maps.max()) <= 1.0


# --- AnomalyCLIP -------------------------------------------------------------------------------
def test_anomalyclip_prompts_are_class_agnostic(small_backbone):
    bb = small_backbone
    m = AnomalyCLIP(bb, generator=torch.Generator().manual_seed(0))
    text = m.text_for(["bottle", "screw", "metal_nut"])
    assert torch.equal(text[0], text[1]) and torch.equal(text[0], text[2])
    batch = _batch(bb, names=("bottle", "screw"))
    renamed = Batch(cls_names=["carpet", "pill"], images=batch.images)
    a, b = m.predict(batch, torch.Generator()), m.predict(renamed, torch.Generator())
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    # the same check catches a class-aware method: APRIL-GAN's maps change with the name
    ag = AprilGAN(bb, CHEAP["aprilgan"], generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ag.predict(batch, torch.Generator()).maps,
                              ag.predict(renamed, torch.Generator()).maps)


def test_deep_text_path_reduces_to_the_backbone_and_uses_the_deep_tokens(small_backbone):
    bb = small_backbone
    ids = bb.tokenize(["X X X X X object.", "X X X X X damaged object."])
    emb, eot = bb.token_embedding(ids), bb.eot_positions(ids)
    with torch.no_grad():
        assert torch.allclose(encode_text_deep(bb, emb, eot, None),
                              bb.encode_text_embeddings(emb, eot), atol=1e-6)
    # deep tokens replace positions 1..2 at the input of text block 2: the output changes and
    # the gradient reaches them
    deep = torch.zeros(1, 2, bb.text_width, requires_grad=True)
    out = encode_text_deep(bb, emb, eot, deep)
    assert not torch.allclose(out, bb.encode_text_embeddings(emb, eot), atol=1e-4)
    out.sum().backward()
    assert deep.grad is not None and float(deep.grad.abs().sum()) > 0
    m = AnomalyCLIP(bb, generator=torch.Generator().manual_seed(0))
    assert m.deep.shape[0] == len(bb.clip.transformer.resblocks) - 1  # capped at the tower


def test_vv_attention_equals_a_per_head_loop(small_backbone):
    blk = small_backbone.clip.visual.transformer.resblocks[1]
    x = torch.randn(2, 5, small_backbone.vision_width, generator=torch.Generator().manual_seed(4))
    w, h = blk.attn.embed_dim, blk.attn.num_heads
    d = w // h
    with torch.no_grad():
        v = blk.ln_1(x) @ blk.attn.in_proj_weight[2 * w:].T + blk.attn.in_proj_bias[2 * w:]
        heads = []
        for i in range(h):
            vi = v[..., i * d:(i + 1) * d]
            a = torch.softmax(vi @ vi.transpose(1, 2) / d ** 0.5, dim=-1)
            heads.append(a @ vi)
        ref = blk.attn.out_proj(torch.cat(heads, -1))
        assert torch.allclose(vv_attention(blk, x), ref, atol=1e-5)


def test_dpam_path(small_backbone):
    bb = small_backbone
    images = _batch(bb).images
    plain = bb.encode_image(images)
    off = encode_image_dpam(bb, images, dpam_from=len(bb.clip.visual.transformer.resblocks) + 1)
    assert torch.allclose(off.patches, plain.patches, atol=1e-5)
    assert torch.allclose(off.global_, plain.global_, atol=1e-5)
    on = encode_image_dpam(bb, images, dpam_from=2)
    assert torch.allclose(on.global_, plain.global_, atol=1e-5)  # CLS stays on the normal path
    assert torch.allclose(on.patches[:, 0], plain.patches[:, 0], atol=1e-5)  # block 1: before
    assert not torch.allclose(on.patches[:, 1:], plain.patches[:, 1:], atol=1e-3)
