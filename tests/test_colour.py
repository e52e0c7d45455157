"""The colour baseline (pfl.baselines.colour): a training-free map of CIELAB distance from the
image's median colour."""

import itertools

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from pfl.baselines import TRAINING_FREE, build
from pfl.baselines.colour import ColourBaseline, colour_distance_maps, lab_box_diagonal
from pfl.config import smoke
from pfl.data.preprocess import image_to_tensor
from pfl.method.contract import Batch, Method
from pfl.run.checkpoints import build_method


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """CLIP-normalised images: textured flat colours, each with one odd-coloured square."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(rng.integers(60, 200, 3) + rng.normal(0, 4, (size, size, 3)), 0, 255)
        r, c = rng.integers(2, size - 10, 2)
        img[r:r + 8, c:c + 8] = rng.integers(0, 256, 3)
        out.append(image_to_tensor(img.astype(np.uint8), size))
    return torch.stack(out)


def _batch(images: torch.Tensor) -> Batch:
    return Batch(cls_names=["x"] * len(images), images=images)


def test_box_diagonal_bounds_every_srgb_colour():
    g = np.linspace(0, 1, 65)
    lab = rgb2lab(np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, -1, 3))[0]
    corners = rgb2lab(np.array(list(itertools.product((0.0, 1.0), repeat=3)))[None])[0]
    np.testing.assert_allclose(lab.min(0), corners.min(0), atol=1e-9)
    np.testing.assert_allclose(lab.max(0), corners.max(0), atol=1e-9)
    assert lab_box_diagonal() == pytest.approx(np.linalg.norm(lab.max(0) - lab.min(0)))
    # the farthest pair of colours stays within [0, 1] after the scaling
    rgb = np.zeros((1, 2, 2, 3))
    rgb[0, 0, 0] = rgb[0, 0, 1] = rgb[0, 1, 0] = (0, 0, 1.0)
    rgb[0, 1, 1] = (0, 1.0, 0)
    assert 0 < colour_distance_maps(rgb).max() <= 1


def test_odd_square_gets_the_highest_values():
    size = 48
    img = np.full((size, size, 3), (120, 160, 90), np.uint8)
    img[10:20, 25:35] = (200, 40, 60)
    x = image_to_tensor(img, size)[None]
    m = ColourBaseline(None).predict(_batch(x), torch.Generator())
    maps = m.maps[0].numpy()
    inside = np.zeros((size, size), bool)
    inside[10:20, 25:35] = True
    assert maps[inside].min() > maps[~inside].max()  # every top value lies in the square
    # top-100 pixels all inside (bicubic resampling only blurs the square's border)
    top = np.argsort(maps.ravel())[-100:]
    assert inside.ravel()[top].all()
    assert float(m.scores[0]) == pytest.approx(maps.max())
    assert 0 <= maps.min() and maps.max() <= 1


def test_scores_do_not_depend_on_the_batch():
    x = _images(5)
    model = ColourBaseline(None)
    whole = model.predict(_batch(x), torch.Generator())
    for i in range(len(x)):
        alone = model.predict(_batch(x[i:i + 1]), torch.Generator())
        torch.testing.assert_close(alone.maps[0], whole.maps[i], rtol=0, atol=0)
        torch.testing.assert_close(alone.scores[0], whole.scores[i], rtol=0, atol=0)
    other = model.predict(_batch(torch.cat([x[:2], _images(3, seed=7)])), torch.Generator())
    torch.testing.assert_close(other.scores[:2], whole.scores[:2], rtol=0, atol=0)


def test_maps_follow_the_image_order():
    x = _images(5)
    model = ColourBaseline(None)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a = model.predict(_batch(x), torch.Generator())
    b = model.predict(_batch(x[perm]), torch.Generator())
    torch.testing.assert_close(b.maps, a.maps[perm], rtol=0, atol=0)
    torch.testing.assert_close(b.scores, a.scores[perm], rtol=0, atol=0)


def test_topk_score_is_the_mean_of_the_largest_values():
    x = _images(2)
    from pfl.baselines.colour import ColourConfig

    pred = ColourBaseline(None, ColourConfig(topk=10)).predict(_batch(x), torch.Generator())
    flat = pred.maps.reshape(2, -1)
    torch.testing.assert_close(pred.scores, flat.sort(1).values[:, -10:].mean(1))


def test_registered_and_training_free(tiny_backbone):
    m = build_method("colour", smoke(), tiny_backbone)
    assert isinstance(m, ColourBaseline) and isinstance(m, Method)
    assert isinstance(build("Colour", tiny_backbone), ColourBaseline)
    assert "colour" in TRAINING_FREE and m.needs_images
    assert list(m.trainable_parameters()) == [] and m.trainable_state_dict() == {}
    with pytest.raises(RuntimeError, match="training-free"):
        m.training_step(_batch(_images(1)), torch.Generator())
    with pytest.raises(ValueError, match="needs images"):
        m.predict(Batch(cls_names=["x"]), torch.Generator())
