import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrtok.pyramid import (
    GaussianPyramid,
    LaplacianPyramid,
    _fused,
    batch_invariant,
    gaussian_pyramid,
    laplacian_pyramid,
    max_levels,
    pyr_down,
    pyr_up,
    reconstruct_laplacian,
)

cv2.setNumThreads(1)


def as_hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).contiguous().numpy()


def cv_down(x: torch.Tensor) -> np.ndarray:
    out = cv2.pyrDown(as_hwc(x))
    return out[..., None] if out.ndim == 2 else out


def cv_up(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    out = cv2.pyrUp(as_hwc(x), dstsize=(size[1], size[0]))
    return out[..., None] if out.ndim == 2 else out


@pytest.mark.parametrize("height", range(1, 14))
def test_pyr_down_and_up_match_opencv_at_every_small_size(height, rng):
    for width in range(1, 14):
        x = torch.rand(3, height, width, generator=rng)
        assert np.abs(as_hwc(pyr_down(x)) - cv_down(x)).max() <= 1e-5
        for out_h in (2 * height - 1, 2 * height):
            for out_w in (2 * width - 1, 2 * width):
                up = pyr_up(x, (out_h, out_w))
                assert up.shape == (3, out_h, out_w)
                assert np.abs(as_hwc(up) - cv_up(x, (out_h, out_w))).max() <= 1e-5


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_every_laplacian_level_matches_opencv(height, width, seed):
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))
    levels = min(4, max_levels(height, width))
    ours = laplacian_pyramid(x, levels)
    current = as_hwc(x)
    for level in range(levels - 1):
        down = cv2.pyrDown(current)
        band = current - cv2.pyrUp(down, dstsize=(current.shape[1], current.shape[0]))
        band = band[..., None] if band.ndim == 2 else band
        assert np.abs(as_hwc(ours[level]) - band).max() <= 1e-5
        current = down
    residual = current[..., None] if current.ndim == 2 else current
    assert np.abs(as_hwc(ours[-1]) - residual).max() <= 1e-5


def test_gaussian_levels_have_ceil_half_shapes():
    x = torch.rand(2, 3, 13, 8)
    levels = gaussian_pyramid(x, 4)
    assert [tuple(g.shape[-2:]) for g in levels] == [(13, 8), (7, 4), (4, 2), (2, 1)]
    assert levels[0] is x  # level 0 is the input itself, not a copy


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (2, 2), (5, 3), (31, 17), (64, 64), (224, 224), (97, 300)])
def test_reconstruction_is_exact(dtype, tol, size, device):
    x = torch.rand(2, 3, *size, dtype=dtype, device=device)
    for levels in {1, min(2, max_levels(*size)), max_levels(*size)}:
        pyramid = laplacian_pyramid(x, levels)
        assert len(pyramid) == levels
        assert (reconstruct_laplacian(pyramid) - x).abs().max().item() <= tol


def test_any_leading_dims_give_the_same_levels_as_single_images(rng):
    video = torch.rand(2, 3, 3, 20, 18, generator=rng)
    batched = laplacian_pyramid(video, 3)
    single = laplacian_pyramid(video[1, 2, 0], 3)
    for a, b in zip(batched, single, strict=True):
        assert a.shape[:3] == (2, 3, 3)
        # 18 images take the depthwise-convolution path, one image the elementwise taps: float32 rounding apart
        assert (a[1, 2, 0] - b).abs().max().item() <= 1e-6
    with batch_invariant():  # the elementwise path at any batch size: the same bits
        for a, b in zip(laplacian_pyramid(video, 3), single, strict=True):
            assert torch.equal(a[1, 2, 0], b)
    assert pyr_down(video[0, 0, 0]).shape == (10, 9)


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3), (13, 8), (31, 64), (97, 300)])
def test_a_stack_of_images_matches_opencv_and_each_image_alone(size, rng):
    """At 12 or more images the operators run as depthwise convolutions (pyramid._fused): the same numbers as
    OpenCV and as the elementwise path each image takes alone, forward and backward."""
    x = torch.rand(4, 3, *size, generator=rng)
    assert _fused(x.flatten(0, 1))
    levels = min(4, max_levels(*size))
    stacked = laplacian_pyramid(x, levels)
    for i in range(4):
        alone = laplacian_pyramid(x[i], levels)
        current = as_hwc(x[i])
        for level in range(levels - 1):
            down = cv2.pyrDown(current)
            band = current - cv2.pyrUp(down, dstsize=(current.shape[1], current.shape[0]))
            band = band[..., None] if band.ndim == 2 else band
            assert np.abs(as_hwc(stacked[level][i]) - band).max() <= 1e-5
            assert (stacked[level][i] - alone[level]).abs().max().item() <= 1e-6
            current = down
    for odd in (0, 1):
        target = (max(1, 2 * size[0] - odd), max(1, 2 * size[1] - odd))
        up = pyr_up(x, target)
        assert np.abs(as_hwc(up[2]) - cv_up(x[2], target)).max() <= 1e-5
    weights = [torch.rand(level.shape, generator=rng) for level in stacked]

    def grad(rows: slice) -> torch.Tensor:
        leaf = x[rows].detach().requires_grad_(True)
        levels_ = laplacian_pyramid(leaf, levels)
        sum((level * w[rows]).sum() for level, w in zip(levels_, weights, strict=True)).backward()
        return leaf.grad

    alone = torch.cat([grad(slice(i, i + 1)) for i in range(4)])
    assert (grad(slice(None)) - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs_keep_their_dtype(dtype, tol, rng):
    x32 = torch.rand(1, 3, 40, 40, generator=rng)
    x = x32.to(dtype)
    pyramid = laplacian_pyramid(x, 3)
    assert all(level.dtype == dtype for level in pyramid)
    assert pyr_up(pyr_down(x), (40, 40)).dtype == dtype
    reference = laplacian_pyramid(x.float(), 3)
    for ours, ref in zip(pyramid, reference, strict=True):
        assert (ours.float() - ref).abs().max().item() <= tol
    assert (reconstruct_laplacian(pyramid).float() - x.float()).abs().max().item() <= 2 * tol


def test_gradcheck_float64():
    x = torch.rand(1, 2, 9, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tuple(laplacian_pyramid(t, 3)), (x,))
    assert torch.autograd.gradcheck(lambda t: pyr_up(t, (17, 12)), (x,))
    assert torch.autograd.gradcheck(lambda t: pyr_down(t), (x,))
    parts = [torch.rand(1, 2, 9, 6, dtype=torch.float64, requires_grad=True),
             torch.rand(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: reconstruct_laplacian([a, b]), tuple(parts))


def test_max_levels():
    assert max_levels(336, 336) == 10
    assert max_levels(1, 1) == 1
    assert max_levels(2, 1) == 2
    assert max_levels(3, 2) == 3
    assert max_levels(224, 100) == 9
    with pytest.raises(ValueError, match="height"):
        max_levels(0, 4)


def test_modules_wrap_the_functions(rng):
    x = torch.rand(2, 3, 32, 24, generator=rng)
    lap = LaplacianPyramid(4)
    assert all(torch.equal(a, b) for a, b in zip(lap(x), laplacian_pyramid(x, 4), strict=True))
    assert torch.allclose(lap.reconstruct(lap(x)), x, atol=1e-6)
    assert len(GaussianPyramid(3)(x)) == 3
    assert "levels=4" in repr(lap)
    with pytest.raises(ValueError, match="levels"):
        LaplacianPyramid(0)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pyr_down(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        pyr_down(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        laplacian_pyramid(torch.rand(5), 1)
    with pytest.raises(ValueError, match="must not be empty"):
        gaussian_pyramid(torch.rand(3, 0, 4), 1)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        laplacian_pyramid(torch.rand(8, 8), 0)
    with pytest.raises(TypeError, match="levels must be an int"):
        laplacian_pyramid(torch.rand(8, 8), 2.0)
    with pytest.raises(ValueError, match="the maximum is 4"):
        laplacian_pyramid(torch.rand(8, 8), 5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        laplacian_pyramid(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="output height must be 7 or 8"):
        pyr_up(torch.rand(4, 4), (9, 8))
    with pytest.raises(TypeError, match="size must be a pair"):
        pyr_up(torch.rand(4, 4), 8)
    with pytest.raises(ValueError, match=r"pyramid\[1\] has shape"):
        reconstruct_laplacian([torch.rand(8, 8), torch.rand(3, 4)])
    with pytest.raises(TypeError, match="non-empty list"):
        reconstruct_laplacian(torch.rand(8, 8))


def test_non_finite_check_can_be_skipped():
    x = torch.rand(6, 6)
    x[0, 0] = float("inf")
    assert not torch.isfinite(pyr_down(x, check_finite=False)).all()


@pytest.mark.parametrize(("size", "pads"), [((5, 7), (2, 2, 2, 1)), ((3, 3), (2, 1, 2, 2)), ((9, 4), (2, 2, 2, 2))])
def test_the_fused_paths_reflect_padding_has_torchs_gradients_to_second_order(size, pads):
    from pyrtok.pyramid import _ReflectPad

    x = torch.rand(2, *size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ReflectPad.apply(t, pads), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _ReflectPad.apply(t, pads), (x,))
    grad = torch.rand(torch.nn.functional.pad(x, pads, mode="reflect").shape, dtype=torch.float64)
    ours = torch.autograd.grad(_ReflectPad.apply(x, pads), x, grad)[0]
    reference = torch.autograd.grad(torch.nn.functional.pad(x, pads, mode="reflect"), x, grad)[0]
    assert torch.allclose(ours, reference, atol=1e-12)


def test_the_fused_path_works_under_forward_ad_torch_func_and_after_inference_mode(rng):
    import torch.autograd.forward_ad as fwad
    from torch.func import grad, vmap

    x = torch.rand(12, 9, 10, generator=rng)
    assert _fused(x)
    with torch.inference_mode():  # nothing it builds may leak into later autograd calls
        laplacian_pyramid(x, 3)

    def total(t: torch.Tensor) -> torch.Tensor:
        return sum(level.sum() for level in laplacian_pyramid(t, 3, check_finite=False))

    leaf = x.clone().requires_grad_(True)
    total(leaf).backward()
    assert torch.allclose(grad(total)(x), leaf.grad, atol=1e-6)
    tangent = torch.rand(x.shape, generator=rng)
    with fwad.dual_level():
        out = pyr_down(fwad.make_dual(x, tangent), check_finite=False)
        assert torch.allclose(fwad.unpack_dual(out).tangent, pyr_down(tangent), atol=1e-6)  # linear: J t = f(t)
    stacked = torch.stack([x, tangent])
    batched = vmap(lambda t: pyr_down(t, check_finite=False))(stacked)
    assert torch.allclose(batched, torch.stack([pyr_down(x), pyr_down(tangent)]), atol=1e-6)
