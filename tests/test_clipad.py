"""CLIP-AD: feature surgery on hand-built text, the staged dual path, and the harness contract."""

import pytest
import torch
from conftest import adam_steps

from pfl.baselines import build
from pfl.baselines.anomalyclip import vv_attention
from pfl.baselines.clipad import (
    CLIPAD,
    CLIPADConfig,
    encode_dual_path,
    feature_surgery,
    surgery_weights,
)
from pfl.clip.backbone import Backbone
from pfl.method.contract import Batch, Method


def _orthonormal(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=g, dtype=torch.float64))
    return q.T  # (n, dim), orthonormal rows


def test_surgery_removes_the_shared_text_direction():
    # Normal and abnormal text share a strong direction s ("the object"); they differ in a, b.
    s, a, b = _orthonormal(3, 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 16, generator=g, dtype=torch.float64)
    text = torch.stack([3.0 * s + a, 3.0 * s + b])  # (2, E)
    raw = x @ text.T
    out = feature_surgery(x, text)
    # Adding any amount of s to the tokens moves the raw similarity of both classes (the
    # "irrelevant highlight") but not the surgery result: it is independent of s (1e-12, fp64).
    shifted = x + 5.0 * s
    assert ((shifted @ text.T) - raw).abs().min() > 14.9
    assert torch.allclose(feature_surgery(shifted, text), out, atol=1e-12, rtol=0)
    # The same holds for how much s the text carries, and the effective text directions are
    # orthogonal to s.
    assert torch.allclose(feature_surgery(x, torch.stack([10.0 * s + a, 10.0 * s + b])), out,
                          atol=1e-12, rtol=0)
    centred = text - text.mean(0)
    assert (centred @ s).abs().max() < 1e-12
    # What is left is half the difference, with opposite signs for the two classes.
    assert torch.allclose(out[:, 1], 0.5 * x @ (b - a), atol=1e-12, rtol=0)
    assert out.sum(-1).abs().max() < 1e-12


def test_surgery_matches_elementwise_reference():
    # CLIP Surgery's formulation: element-wise products, minus their weighted class mean,
    # summed over channels; brute force with Python loops (fp64, 1e-12).
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)  # (N, L, T, E)
    text = torch.randn(2, 1, 2, 8, generator=g, dtype=torch.float64)  # (N, 1, K, E)
    weights = torch.rand(2, 3, 2, generator=g, dtype=torch.float64) + 0.5  # (N, L, K)
    out = feature_surgery(tokens, text, weights)
    ref = torch.empty(2, 3, 5, 2, dtype=torch.float64)
    for n in range(2):
        for li in range(3):
            for t in range(5):
                prods = [weights[n, li, k] * tokens[n, li, t] * text[n, 0, k] for k in range(2)]
                redundant = sum(prods) / 2
                for k in range(2):
                    ref[n, li, t, k] = (prods[k] - redundant).sum()
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    # Equal weights are no weights.
    ones = torch.ones(2, 3, 2, dtype=torch.float64)
    assert torch.allclose(feature_surgery(tokens, text, ones), feature_surgery(tokens, text),
                          atol=1e-12, rtol=0)


def test_surgery_weights_by_hand():
    cls = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = surgery_weights(cls, text)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(w[0], p / p.mean(), atol=1e-7)
    assert torch.allclose(w.mean(-1), torch.ones(1))
    # An image equally close to both prompts weighs them equally.
    assert torch.allclose(surgery_weights(torch.tensor([[0.6, 0.6]]), text), torch.ones(1, 2))


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_dual_path_original_equals_backbone(tiny_backbone):
    x = _images(2, tiny_backbone.image_size)
    dual = encode_dual_path(tiny_backbone, x)
    plain = tiny_backbone.encode_image(x)
    assert torch.allclose(dual.original.patches, plain.patches, atol=1e-5, rtol=0)
    assert torch.allclose(dual.original.global_, plain.global_, atol=1e-5, rtol=0)


@pytest.mark.parametrize("staged", [True, False])
def test_staged_surgery_stream_matches_block_loop(tiny_backbone, staged):
    bb = Backbone(tiny_backbone.clip, layers=(2, 4))  # two stages of two blocks each
    x = _images(2, bb.image_size, seed=3)
    dual = encode_dual_path(bb, x, staged=staged)
    visual = bb.clip.visual
    with torch.no_grad():
        h = [visual._embeds(x)]
        for block in visual.transformer.resblocks:
            h.append(block(h[-1]))
        vv = [vv_attention(block, h[i]) for i, block in enumerate(visual.transformer.resblocks)]
    if staged:
        expect = [vv[0] + vv[1], vv[2] + vv[3]]
    else:
        expect = [vv[0] + vv[1], vv[0] + vv[1] + vv[2] + vv[3]]
    for i in range(2):
        assert torch.allclose(dual.surgery[:, i], expect[i][:, 1:], atol=1e-5, rtol=0)
        assert torch.allclose(dual.cls[:, i], h[2 * (i + 1)][:, 0], atol=1e-5, rtol=0)


SP = {"train_prompts": "sp", "infer_prompts": "sp"}  # the single prompt pair: fast to encode


def _batch(backbone: Backbone, n: int = 4, seed: int = 0) -> Batch:
    s = backbone.image_size
    masks = torch.zeros(n, s, s)
    for i in range(1, n, 2):  # odd images anomalous, with a square defect
        masks[i, s // 4: s // 2, s // 3: s // 3 + s // 4] = 1.0
    images = _images(n, s, seed)
    images = images + 2.0 * masks[:, None]  # the defect is visible in the pixels
    return Batch(cls_names=["bottle", "metal_nut"] * (n // 2), images=images, masks=masks,
                 labels=(masks.flatten(1).amax(1) > 0).long())


def test_predict_contract_and_modes(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    m = CLIPAD(tiny_backbone, CLIPADConfig(**SP), generator=g)
    assert isinstance(m, Method) and m.name == "CLIP-AD"
    assert isinstance(build("CLIP-AD", tiny_backbone, CLIPADConfig(**SP)), CLIPAD)
    batch = _batch(tiny_backbone)
    m.train(True)
    assert not m.needs_images  # training reads cached features only
    m.train(False)
    assert m.needs_images
    pred = m.predict(batch, g)
    s = tiny_backbone.image_size
    assert pred.maps.shape == (4, s, s) and pred.scores.shape == (4,)
    assert float(pred.maps.min()) >= 0.0 and float(pred.maps.max()) <= 1.0
    assert float(pred.scores.min()) >= 0.0 and float(pred.scores.max()) <= 1.0
    with pytest.raises(ValueError, match="needs images"):
        m.predict(Batch(cls_names=batch.cls_names, feats=tiny_backbone.encode_image(batch.images),
                        masks=batch.masks), g)
    # Cached features only: the surgery runs on the original path's tokens.
    cached = CLIPAD(tiny_backbone, CLIPADConfig(dual_path=False, **SP),
                    torch.Generator().manual_seed(0))
    assert not cached.eval().needs_images
    p2 = cached.predict(Batch(cls_names=batch.cls_names,
                              feats=tiny_backbone.encode_image(batch.images)), g)
    assert p2.maps.shape == (4, s, s)


def test_map_is_affine_in_the_published_sum(tiny_backbone):
    # The published map is sum_l surgery_l + sum_l adapters_l; ours is (M / L + 1) / 3.
    cfg = CLIPADConfig(image_score="global", **SP)
    m = CLIPAD(tiny_backbone, cfg, torch.Generator().manual_seed(0)).eval()
    batch = _batch(tiny_backbone)
    pred = m.predict(batch, torch.Generator())
    text = m.text[cfg.infer_prompts](batch.cls_names)
    with torch.no_grad():
        adapted = m.pixel_probs(Batch(cls_names=batch.cls_names, images=batch.images),
                                cfg.infer_prompts)
        dual = encode_dual_path(tiny_backbone, batch.images)
        tokens = torch.nn.functional.normalize(tiny_backbone.project_patches(dual.surgery), dim=-1)
        cls = torch.nn.functional.normalize(tiny_backbone.project_patches(dual.cls), dim=-1)
        surg = m.surgery_probs(tokens, cls, text)
        n_layers = surg.shape[1]
        surg = torch.nn.functional.interpolate(
            surg.reshape(4, n_layers, *tiny_backbone.grid), size=pred.maps.shape[-2:],
            mode="bilinear", align_corners=False)
    published = surg.sum(1) + adapted.sum(1)
    assert torch.allclose(pred.maps, (published / n_layers + 1) / 3, atol=1e-5, rtol=0)
    assert float(surg.abs().max()) <= 1.0 + 1e-6


def test_training_reduces_loss_and_state_round_trip(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    m = CLIPAD(tiny_backbone, CLIPADConfig(**SP), generator=g)
    batch = _batch(tiny_backbone)
    batch.features(tiny_backbone)
    losses = adam_steps(m, batch, 6, 1e-2, g)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in tiny_backbone.parameters())
    state = m.trainable_state_dict()
    fresh = CLIPAD(tiny_backbone, CLIPADConfig(**SP), generator=torch.Generator().manual_seed(5))
    fresh.load_trainable_state_dict(state)
    m.eval()
    fresh.eval()
    a, b = m.predict(batch, g), fresh.predict(batch, g)
    assert torch.allclose(a.maps, b.maps) and torch.allclose(a.scores, b.scores)
