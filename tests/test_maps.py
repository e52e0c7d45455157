"""The fused map kernel against the straightforward upsample -> sigmoid -> mean."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from pfl.method.maps import (
    compiled_maps,
    fused_maps,
    interpolation_matrix,
    mean_sigmoid_reference,
    sample_std_reference,
)

# (patch grid, image size): the smoke and paper ratios (x14), a non-integer one, a downscale.
SIZES = [(4, 56), (5, 37), (7, 10), (6, 4)]


def _diff(shape, scale=4.0, dtype=torch.float64, seed=0):
    return scale * torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("h, out", SIZES)
def test_interpolation_matrix_is_torchs_bilinear(h, out, align_corners):
    x = _diff((1, 1, h, h))
    a = interpolation_matrix(h, out, align_corners, dtype=x.dtype)
    ref = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(a @ x[0, 0] @ a.T, ref[0, 0], atol=1e-13, rtol=0)
    torch.testing.assert_close(a.sum(1), torch.ones(out, dtype=a.dtype), atol=1e-15, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("h, out", SIZES)
def test_fused_equals_reference_in_float64(h, out, align_corners):
    diff = _diff((2, 3, 6, h, h))
    ref = mean_sigmoid_reference(diff, (out, out), align_corners)
    got = fused_maps(diff, (out, out), align_corners, n_samples=3)
    torch.testing.assert_close(got.layer_maps, ref, atol=1e-14, rtol=0)
    std = sample_std_reference(diff, (out, out), 3, align_corners)
    torch.testing.assert_close(got.sample_std, std, atol=1e-12, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_fused_float32_within_1e6_of_the_exact_maps(align_corners):
    # Logits up to ~+-30 (exp(tau) = 14.3 times a cosine difference): the float32 reference
    # itself is ~1e-6 off the float64 maps there; the fused kernel stays within 1e-6 of them.
    diff = _diff((1, 2, 20, 8, 8), scale=10.0, dtype=torch.float32)
    exact = mean_sigmoid_reference(diff.double(), (112, 112), align_corners)
    got = fused_maps(diff, (112, 112), align_corners, n_samples=10)
    assert got.layer_maps.dtype == torch.float32
    assert float((got.layer_maps.double() - exact).abs().max()) < 1e-6
    std = sample_std_reference(diff.double(), (112, 112), 10, align_corners)
    assert float((got.sample_std.double() - std).abs().max()) < 1e-6


@pytest.mark.parametrize("row_step", ["lerp", "matmul"])
@pytest.mark.parametrize("block", [1, 500, 7 * 3 * 6 * 37, 10**9])
def test_blocks_and_row_steps_change_nothing(block, row_step):
    # One row per block, multi-row blocks, whole images, the whole batch; both row steps.
    diff = _diff((3, 2, 6, 5, 5))
    ref = fused_maps(diff, (37, 37), n_samples=2)
    got = fused_maps(diff, (37, 37), n_samples=2, block_elements=block, row_step=row_step)
    torch.testing.assert_close(got.layer_maps, ref.layer_maps, atol=1e-15, rtol=0)
    torch.testing.assert_close(got.sample_std, ref.sample_std, atol=1e-15, rtol=0)


def test_sample_std_is_zero_for_one_sample_and_none_unless_asked():
    diff = _diff((1, 2, 3, 4, 4))
    assert fused_maps(diff, (8, 8)).sample_std is None
    assert torch.equal(fused_maps(diff, (8, 8), n_samples=1).sample_std, torch.zeros(1, 8, 8,
                                                                                     dtype=diff.dtype))


def test_autocast_does_not_lower_the_maps_precision():
    diff = _diff((1, 2, 3, 4, 4), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_maps(diff, (16, 16))
    assert got.layer_maps.dtype == torch.float32
    torch.testing.assert_close(got.layer_maps, fused_maps(diff, (16, 16)).layer_maps)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_maps_equal_the_exact_maps_in_float32():
    # One compilation (maps, spread and per-sample maps of one shape), as the fused test above.
    diff = _diff((1, 2, 20, 8, 8), scale=10.0, dtype=torch.float32)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":  # CI's plain-kernel pass
        with pytest.raises(RuntimeError, match="map_kernel='fused'"):
            compiled_maps(diff, (112, 112))
        return
    with torch.no_grad():
        got = compiled_maps(diff, (112, 112), n_samples=10, keep_samples=True)
    exact = mean_sigmoid_reference(diff.double(), (112, 112))
    assert got.layer_maps.dtype == torch.float32
    assert float((got.layer_maps.double() - exact).abs().max()) < 1e-6
    std = sample_std_reference(diff.double(), (112, 112), 10)
    assert float((got.sample_std.double() - std).abs().max()) < 1e-6
    fused = fused_maps(diff, (112, 112), n_samples=10, keep_samples=True)
    torch.testing.assert_close(got.sample_maps, fused.sample_maps, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="inference"):
        compiled_maps(diff.requires_grad_(), (112, 112))
    with pytest.raises(ValueError, match="B x R"):
        compiled_maps(torch.zeros(1, 1, 6, 4, 4), (8, 8), n_samples=4)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="N, L, M, h, w"):
        fused_maps(torch.zeros(2, 3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="row_step"):
        fused_maps(torch.zeros(1, 1, 6, 4, 4), (8, 8), row_step="gather")
    with pytest.raises(ValueError, match="B x R"):
        fused_maps(torch.zeros(1, 1, 6, 4, 4), (8, 8), n_samples=4)


@pytest.mark.parametrize("block", [500, 10**9])
def test_training_path_equals_inference_path_and_its_gradient_the_reference(block):
    # With autograd the blocks are concatenated, without it written into one buffer: the same
    # values bit for bit, samples and spread included; the gradient is the reference's.
    diff = _diff((2, 2, 6, 5, 5))
    with torch.no_grad():
        plain = fused_maps(diff, (37, 37), n_samples=3, keep_samples=True, block_elements=block)
    leaf = diff.clone().requires_grad_()
    tracked = fused_maps(leaf, (37, 37), n_samples=3, keep_samples=True, block_elements=block)
    for name in ("layer_maps", "sample_std", "sample_maps"):
        assert torch.equal(getattr(tracked, name).detach(), getattr(plain, name)), name
    weights = _diff((2, 2, 37, 37), seed=1)
    (grad,) = torch.autograd.grad((tracked.layer_maps * weights).sum(), leaf)
    ref_leaf = diff.clone().requires_grad_()
    ref = mean_sigmoid_reference(ref_leaf, (37, 37))
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_leaf)
    torch.testing.assert_close(grad, ref_grad, atol=1e-14, rtol=0)
