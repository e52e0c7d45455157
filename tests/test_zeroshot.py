"""Training-free zero-shot maps."""

import torch
import torch.nn.functional as F

from pfl.clip.backbone import Backbone, create_clip
from pfl.clip.zeroshot import text_pair, zero_shot_maps
from pfl.config import BackboneConfig


def test_maps_equal_softmax_of_upsampled_pair():
    bb = Backbone(create_clip(BackboneConfig(model_name="pfl-tiny", image_size=56)))
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    maps = zero_shot_maps(bb, x, "bottle", temperature=0.1)
    assert maps.shape == (2, len(bb.layers), 56, 56)
    # slow reference: both logits upsampled, then a two-way softmax
    text = text_pair(bb, "bottle")
    tok = F.normalize(bb.project_patches(bb.encode_image(x).patches), dim=-1)
    logits = (tok @ text.T / 0.1).permute(0, 1, 3, 2)  # (N, L, 2, T)
    logits = logits.reshape(2 * len(bb.layers), 2, 4, 4)
    up = F.interpolate(logits, size=(56, 56), mode="bilinear", align_corners=False)
    ref = up.softmax(1)[:, 1].reshape(2, len(bb.layers), 56, 56)
    assert torch.allclose(maps, ref, atol=1e-6)
