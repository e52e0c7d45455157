"""The frozen CLIP wrapper: tapped layers, pos-embed resize, exact truncated text path, loading."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pfl.baselines.hooks import append_tokens, overwrite_tokens
from pfl.clip.backbone import (
    DEFAULT_TOWER,
    TOWERS,
    Backbone,
    MissingWeightsError,
    create_clip,
    default_layers,
    load_weights,
    register_configs,
)
from pfl.config import BackboneConfig, active

PROMPTS = ["a photo of a flawless bottle", "a damaged printed circuit board", "x", "a b c d e f"]


@pytest.fixture(scope="module")
def tiny():
    # A random-init tower is enough for the exactness checks below.
    cfg = BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=0)
    clip = create_clip(cfg)
    return Backbone(clip)


def test_text_truncation_equals_open_clip(tiny):
    ids = tiny.tokenize(PROMPTS)
    ref = tiny.clip.encode_text(ids, normalize=True)
    ours = tiny.encode_text(PROMPTS)
    assert torch.allclose(ours, ref, atol=1e-5)
    # the cut really happens: the longest prompt is far shorter than 77 tokens
    assert int(tiny.eot_positions(ids).max()) + 1 < 20


def test_text_path_passes_gradients_to_embeddings(tiny):
    ids = tiny.tokenize(PROMPTS[:2])
    emb = tiny.token_embedding(ids).clone().requires_grad_(True)
    tiny.encode_text_embeddings(emb, tiny.eot_positions(ids)).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_layers_equal_forward_hooks(tiny):
    taps = {}
    blocks = tiny.clip.visual.transformer.resblocks
    handles = [
        blocks[i - 1].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out))
        for i in tiny.layers
    ]
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    feats = tiny.encode_image(x)
    for h in handles:
        h.remove()
    assert feats.patches.shape == (2, len(tiny.layers), 64, tiny.vision_width)
    for k, i in enumerate(tiny.layers):
        assert torch.equal(feats.patches[:, k], taps[i][:, 1:])  # CLS dropped
    # the global feature is open_clip's own image embedding
    assert torch.allclose(feats.global_, tiny.clip.encode_image(x), atol=1e-6)


def test_backbone_is_frozen_and_stays_in_eval(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.clip.training


def test_default_layers_of_paper_tower():
    assert default_layers(24) == (6, 12, 18, 24)
    assert active("paper").backbone.layers == (6, 12, 18, 24)


def test_pos_embed_resize_on_load(tmp_path):
    """Weights saved at 168 px load at 224 px with a bicubic, antialiased grid resize."""
    from safetensors.torch import save_file

    small = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=168, init_seed=3))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    big = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=224, weights=str(path)))
    old = small.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 12, 12, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(256, -1)
    new = big.visual.positional_embedding.detach()
    assert new.shape == (257, old.shape[1])
    assert torch.equal(new[0], old[0])  # the CLS position is kept
    assert torch.allclose(new[1:], want, atol=1e-6)
    assert torch.equal(big.visual.conv1.weight, small.visual.conv1.weight)


def test_load_torch_pickle_and_torchscript_archive(tmp_path):
    """Both a plain state-dict pickle and an OpenAI-style TorchScript archive load."""
    src = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=5))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=6))
    load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.visual.proj, src.visual.proj)

    traced = torch.jit.trace(_holder(src), torch.zeros(1))
    traced.save(str(tmp_path / "openai.pt"))
    dst2 = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=7))
    load_weights(dst2, tmp_path / "openai.pt")
    assert torch.equal(dst2.token_embedding.weight, src.token_embedding.weight)


def test_wrong_weights_file_names_it(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    model = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112))
    with pytest.raises(ValueError, match="bad.pt"):
        load_weights(model, tmp_path / "bad.pt")


def test_paper_profile_without_weights_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip here
    monkeypatch.delenv("PFL_CLIP_WEIGHTS", raising=False)
    monkeypatch.setenv("PFL_PROFILE", "paper")
    with pytest.raises(MissingWeightsError, match="PFL_CLIP_WEIGHTS") as err:
        create_clip(active().backbone)
    assert "ViT-L-14-336px.pt" in str(err.value)
    monkeypatch.setenv("PFL_CLIP_WEIGHTS", str(tmp_path / "nowhere.pt"))
    with pytest.raises(MissingWeightsError, match="nowhere.pt"):
        create_clip(active().backbone)


@pytest.mark.skipif(not all(p.is_file() for p in TOWERS.values()), reason="no shipped towers")
def test_shipped_towers_load_by_name_and_the_default_is_v2():
    def tensors(weights):
        return create_clip(BackboneConfig(image_size=112, weights=weights)).state_dict()

    default, v1, v2 = tensors(None), tensors("tiny-v1"), tensors("tiny-v2")
    assert DEFAULT_TOWER == "tiny-v2"
    assert all(torch.equal(default[k], v2[k]) for k in v2)
    assert not torch.equal(v1["visual.conv1.weight"], v2["visual.conv1.weight"])
    by_path = tensors(str(TOWERS["tiny-v1"]))
    assert all(torch.equal(by_path[k], v1[k]) for k in v1)
    with pytest.raises(ValueError, match="pfl-tiny"):
        create_clip(BackboneConfig(model_name="ViT-B-32", weights="tiny-v1"), load=True)


def test_shipped_tiny_config_is_small():
    register_configs()
    cfg = open_clip.get_model_config("pfl-tiny")
    assert cfg["vision_cfg"]["width"] == 128
    model = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112))
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 6e6


@pytest.mark.slow
def test_text_truncation_equals_open_clip_vit_b16():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    bb = Backbone(clip)
    ref = clip.encode_text(bb.tokenize(PROMPTS), normalize=True)
    assert torch.allclose(bb.encode_text(PROMPTS), ref, atol=1e-5)


def test_deep_prompt_paths(tiny):
    """Zero-length prompts equal the plain paths; real prompts change both towers' features."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 112, 112, generator=g)
    plain = tiny.encode_image(x)
    n_tok = 1 + tiny.grid[0] * tiny.grid[1]
    empty = tiny.encode_image(x, append_tokens(torch.zeros(2, 0, tiny.vision_width), n_tok))
    assert torch.allclose(empty.patches, plain.patches, atol=1e-5)
    assert torch.allclose(empty.global_, plain.global_, atol=1e-5)
    vp = (0.5 * torch.randn(2, 3, tiny.vision_width, generator=g)).requires_grad_(True)
    prompted = tiny.encode_image(x, append_tokens(vp, n_tok))
    assert prompted.patches.shape == plain.patches.shape
    assert (prompted.patches - plain.patches).abs().max() > 1e-3
    prompted.global_.sum().backward()
    assert vp.grad is not None and vp.grad.abs().sum() > 0

    ids = tiny.tokenize(["X X a photo of a bottle", "X X a damaged bottle"])
    emb, eot = tiny.token_embedding(ids), tiny.eot_positions(ids)
    ref = tiny.encode_text_embeddings(emb, eot)
    # deep prompts are whole tokens (no positional embedding is added to them): replacing the
    # slot at block 0 by its own embedded tokens leaves the features unchanged
    own = (emb + tiny.clip.positional_embedding[: emb.shape[1]])[:, 1:3].unsqueeze(0)
    same = tiny.encode_text_embeddings(emb, eot, overwrite_tokens(own))
    assert torch.allclose(same, ref, atol=1e-5)
    tp = 0.5 * torch.randn(2, 2, tiny.text_width, generator=g)
    assert (tiny.encode_text_embeddings(emb, eot, overwrite_tokens(tp)) - ref).abs().max() > 1e-3


def _holder(m: torch.nn.Module) -> torch.nn.Module:
    """A module with the same parameter names as ``m``, traceable to a TorchScript archive
    (OpenAI's released ``.pt`` files are such archives)."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, p in m.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for name, child in m.named_children():
                self.add_module(name, child)

        def forward(self, x):
            return x

    return Holder()


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_fp16_openai_file_loads_with_pos_embed_resize(tmp_path, kind):
    """An fp16 file (as OpenAI ships ViT-L-14-336px.pt) loads at a size that needs the
    positional-embedding resize: cast to fp32 first, then resize (no Half bicubic on CPU)."""
    src = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=8))
    src16 = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=112, init_seed=8))
    src16.half()
    path = tmp_path / "ViT-tiny-fp16.pt"
    if kind == "torchscript":
        torch.jit.trace(_holder(src16), torch.zeros(1)).save(str(path))
    else:
        torch.save(src16.state_dict(), path)
    dst = create_clip(BackboneConfig(model_name="pfl-tiny", image_size=140, weights=str(path)))
    assert dst.visual.conv1.weight.dtype == torch.float32
    # fp16 -> fp32 is exact: the loaded weights are the fp16 values.
    assert torch.equal(dst.visual.conv1.weight, src.visual.conv1.weight.half().float())
    # The resize ran on the fp32 cast of the fp16 grid.
    old = src.visual.positional_embedding.detach().half().float()
    g = int(round((old.shape[0] - 1) ** 0.5))
    grid = old[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(10, 10), mode="bicubic", antialias=True,
                         align_corners=False).permute(0, 2, 3, 1).reshape(100, -1)
    new = dst.visual.positional_embedding.detach()
    assert new.shape == (101, old.shape[1])
    assert torch.equal(new[0], old[0])
    assert torch.allclose(new[1:], want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_prefix_equals_the_full_sequences(tiny, dtype):
    # G groups of S prompts sharing P0 leading tokens, EOTs at different places per group:
    # the prefix-once path gives what the plain path gives on every full sequence.
    g, s, p0, l1, w = 3, 2, 4, 7, tiny.text_width
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(g, p0, w, generator=gen, dtype=dtype)
    suffix = torch.randn(g, s, l1, w, generator=gen, dtype=dtype)
    eot = torch.tensor([p0 + 2, p0 + l1 - 1, p0])
    full = torch.cat([prefix[:, None].expand(g, s, p0, w), suffix], dim=2)
    bb = tiny.to(dtype)
    try:
        plain = bb.encode_text_embeddings(full.flatten(0, 1), eot.repeat_interleave(s))
        shared = bb.encode_text_shared_prefix(prefix, suffix, eot)
    finally:
        tiny.float()
    atol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(shared, plain.view(g, s, -1), atol=atol, rtol=0)


def test_shared_prefix_passes_gradients(tiny):
    w = tiny.text_width
    prefix = torch.randn(2, 3, w, requires_grad=True)
    suffix = torch.randn(2, 2, 4, w, requires_grad=True)
    tiny.encode_text_shared_prefix(prefix, suffix, torch.tensor([5, 6])).sum().backward()
    assert prefix.grad.abs().sum() > 0 and suffix.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())
