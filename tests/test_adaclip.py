"""AdaCLIP: prompt-free path = frozen towers, prompts reach both towers, gradients, HSF by hand."""

import pytest
import torch
import torch.nn.functional as F
from conftest import adam_steps

from pfl.baselines import build
from pfl.baselines.adaclip import (
    AdaCLIP,
    AdaCLIPConfig,
    adaclip_sentences,
    hsf_official,
    hsf_paper,
)
from pfl.clip.backbone import Backbone
from pfl.method.contract import Batch, Method
from pfl.method.prompts import PLACEHOLDER


def _batch(backbone: Backbone, n: int = 4, seed: int = 0, classes=("bottle", "metal_nut")) -> Batch:
    s = backbone.image_size
    masks = torch.zeros(n, s, s)
    for i in range(1, n, 2):  # odd images anomalous, with a square defect
        masks[i, s // 4: s // 2, s // 3: s // 3 + s // 4] = 1.0
    images = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))
    images = images + 2.0 * masks[:, None]
    names = [classes[i % len(classes)] for i in range(n)]
    return Batch(cls_names=names, images=images, masks=masks,
                 labels=(masks.flatten(1).amax(1) > 0).long())


def _plain_text(backbone: Backbone, words: str, prefix: int = 0) -> torch.Tensor:
    """(2, E) normalised mean of the normalised features of AdaCLIP's sentences, plain CLIP."""
    rows = []
    for sentences in adaclip_sentences(words):
        texts = [" ".join([PLACEHOLDER] * prefix + [t]) for t in sentences]
        with torch.no_grad():
            rows.append(backbone.encode_text(texts).mean(0))
    return F.normalize(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("cfg", [AdaCLIPConfig(n_prompts=0), AdaCLIPConfig(branches="")])
def test_prompt_free_path_equals_frozen_towers(tiny_backbone, cfg):
    m = AdaCLIP(tiny_backbone, cfg, torch.Generator().manual_seed(0))
    batch = _batch(tiny_backbone)
    with torch.no_grad():
        feats, text = m.tower_features(batch)
        plain = tiny_backbone.encode_image(batch.images)
    assert torch.allclose(feats.patches, plain.patches, atol=1e-5, rtol=0)
    assert torch.allclose(feats.global_, plain.global_, atol=1e-5, rtol=0)
    for i, name in enumerate(batch.cls_names):
        words = "metal nut" if name == "metal_nut" else name
        assert torch.allclose(text[i], _plain_text(tiny_backbone, words), atol=1e-5, rtol=0)


def test_prompts_change_both_towers_and_dynamic_text_is_per_image(tiny_backbone):
    batch = _batch(tiny_backbone, classes=("bottle",))
    free = AdaCLIP(tiny_backbone, AdaCLIPConfig(n_prompts=0), torch.Generator().manual_seed(0))
    hybrid = AdaCLIP(tiny_backbone, AdaCLIPConfig(), torch.Generator().manual_seed(0))
    static = AdaCLIP(tiny_backbone, AdaCLIPConfig(prompt_type="S"),
                     torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0, t0 = free.tower_features(batch)
        f1, t1 = hybrid.tower_features(batch)
        _, t2 = static.tower_features(batch)
    assert (f1.patches - f0.patches).abs().max() > 1e-3
    assert (f1.global_ - f0.global_).abs().max() > 1e-3
    assert (t1 - t0).abs().max() > 1e-3
    assert (t2 - t0).abs().max() > 1e-3
    # All four images are "bottle": static text is one per class, hybrid text one per image.
    assert torch.allclose(t2[0], t2[1:], atol=1e-6)
    assert (t1[0] - t1[1]).abs().max() > 1e-5


def test_text_prompts_fill_the_placeholder_positions(tiny_backbone):
    # With one prompted block whose prompt is the placeholder's own (token + position)
    # embedding and a zero dynamic part, the prompted text equals plain CLIP on the
    # placeholder sentences: the prompts land exactly on positions 1..n of every sentence.
    cfg = AdaCLIPConfig(n_prompts=2, depth=1, branches="L")
    m = AdaCLIP(tiny_backbone, cfg, torch.Generator().manual_seed(0))
    holder = tiny_backbone.tokenize([PLACEHOLDER])[0, 1]
    own = tiny_backbone.token_embedding(holder.expand(2)) + \
        tiny_backbone.clip.positional_embedding[1:3]
    with torch.no_grad():
        m.static["L"].copy_(own[None])
        m.dynamic["L"].weight.zero_()
        m.dynamic["L"].bias.zero_()
        _, text = m.tower_features(_batch(tiny_backbone))
    assert torch.allclose(text[0], _plain_text(tiny_backbone, "bottle", prefix=2), atol=1e-5)
    assert torch.allclose(text[1], _plain_text(tiny_backbone, "metal nut", prefix=2), atol=1e-5)


def test_only_new_parameters_get_gradients(tiny_backbone):
    m = AdaCLIP(tiny_backbone, AdaCLIPConfig(k_clusters=3), torch.Generator().manual_seed(0))
    m.train(True)
    loss = m.training_step(_batch(tiny_backbone), torch.Generator().manual_seed(0))
    loss.total.backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    named = dict(m.named_parameters())
    own = {n for n in named if not n.startswith("backbone.")}
    assert own == {"static.V", "static.L", "dynamic.V.weight", "dynamic.V.bias",
                   "dynamic.L.weight", "dynamic.L.bias", "adapters.weight", "adapters.bias",
                   "global_map.weight", "global_map.bias"}
    assert {id(p) for p in m.trainable_parameters()} == {id(named[n]) for n in own}
    for n in own:
        assert named[n].grad is not None and named[n].grad.abs().max() > 0, n


def test_hsf_paper_picks_the_most_abnormal_cluster():
    # Two tight groups of patches: 0-2 near e0, 3-5 near e1 (both layers); 3-5 are abnormal.
    base = torch.tensor([[1.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0]] * 3)
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(base[None].repeat(2, 1, 1) + 0.05 * torch.randn(2, 6, 3, generator=g),
                         dim=-1)
    scores = torch.tensor([0.1, 0.2, 0.05, 0.9, 0.8, 0.7])
    out = hsf_paper(tokens, scores, k=2, seed=0)
    expect = F.normalize(tokens.mean(0)[3:].mean(0), dim=-1)
    assert torch.allclose(out, expect, atol=1e-6)
    # The authors' variant: k = 1 keeps the 5 most abnormal patches and averages them.
    one = hsf_official(tokens, scores, k=1, seed=0)
    top5 = [0, 1, 3, 4, 5]
    assert torch.allclose(one, F.normalize(tokens[:, top5].mean((0, 1)), dim=-1), atol=1e-6)
    # k = 2 (all 6 patches kept): the mean of the two group centres.
    two = hsf_official(tokens, scores, k=2, seed=0)
    centres = torch.stack([tokens[:, :3].mean((0, 1)), tokens[:, 3:].mean((0, 1))])
    assert torch.allclose(two, F.normalize(centres.mean(0), dim=-1), atol=1e-6)


def test_contract_predict_and_state(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    m = AdaCLIP(tiny_backbone, AdaCLIPConfig(hsf="official", k_clusters=3), g)
    assert isinstance(m, Method) and m.needs_images and m.name == "AdaCLIP"
    assert isinstance(build("AdaCLIP", tiny_backbone, AdaCLIPConfig(k_clusters=3)), AdaCLIP)
    groups = m.parameter_groups()
    assert sorted(id(p) for ps in groups.values() for p in ps) == \
        sorted(id(p) for p in m.trainable_parameters())
    batch = _batch(tiny_backbone)
    m.eval()
    pred = m.predict(batch, torch.Generator().manual_seed(1))
    s = tiny_backbone.image_size
    assert pred.maps.shape == (4, s, s) and pred.scores.shape == (4,)
    assert float(pred.maps.min()) >= 0 and float(pred.maps.max()) <= 1
    again = m.predict(batch, torch.Generator().manual_seed(1))  # seeded k-means: same result
    assert torch.equal(pred.scores, again.scores)
    fresh = AdaCLIP(tiny_backbone, AdaCLIPConfig(hsf="official", k_clusters=3),
                    torch.Generator().manual_seed(9)).eval()
    fresh.load_trainable_state_dict(m.trainable_state_dict())
    other = fresh.predict(batch, torch.Generator().manual_seed(1))
    assert torch.allclose(other.maps, pred.maps) and torch.allclose(other.scores, pred.scores)
    with pytest.raises(ValueError, match="same AdaCLIPConfig"):
        AdaCLIP(tiny_backbone, AdaCLIPConfig(prompt_type="S")).load_trainable_state_dict(
            m.trainable_state_dict())
    with pytest.raises(ValueError, match="reads pixels"):
        m.predict(Batch(cls_names=batch.cls_names,
                        feats=tiny_backbone.encode_image(batch.images)), g)


def test_training_reduces_loss_on_a_fixed_batch(tiny_backbone):
    m = AdaCLIP(tiny_backbone, AdaCLIPConfig(k_clusters=3), torch.Generator().manual_seed(0))
    batch = _batch(tiny_backbone)
    losses = adam_steps(m, batch, 4, 1e-2, torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0] - 0.05, losses
