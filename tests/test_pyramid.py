import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrtok import _pyramid_native_ops as native_ops
from pyrtok.pyramid import (
    GaussianPyramid,
    LaplacianPyramid,
    elementwise,
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
        assert torch.equal(a[1, 2, 0], b)  # every path gives an image the same bits alone or in a batch
    with elementwise():
        for a, b in zip(laplacian_pyramid(video, 3), single, strict=True):
            assert torch.equal(a[1, 2, 0], b)
    assert pyr_down(video[0, 0, 0]).shape == (10, 9)


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3), (13, 8), (31, 64), (97, 300)])
def test_a_stack_of_images_matches_opencv_and_each_image_alone(size, rng):
    """A stack's levels are OpenCV's and each image's alone, forward and backward (the native kernels split a
    stack over threads by rows of work, which must not change an image's numbers)."""
    x = torch.rand(4, 3, *size, generator=rng)
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
            assert torch.equal(stacked[level][i], alone[level])
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
    # second order too: the native kernels' backward runs through their transposes, themselves differentiable
    assert torch.autograd.gradgradcheck(lambda t: tuple(laplacian_pyramid(t, 3)), (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: reconstruct_laplacian([a, b]), tuple(parts))


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
    with pytest.raises(ValueError, match=r"pyramid\[1\] is on meta, expected cpu"):
        reconstruct_laplacian([torch.rand(8, 8), torch.rand(4, 4, device="meta")])


def test_non_finite_check_can_be_skipped():
    x = torch.rand(6, 6)
    x[0, 0] = float("inf")
    assert not torch.isfinite(pyr_down(x, check_finite=False)).all()


def test_the_native_path_works_under_forward_ad_torch_func_and_after_inference_mode(rng):
    import torch.autograd.forward_ad as fwad
    from torch.func import grad, vmap

    x = torch.rand(12, 9, 10, generator=rng)
    assert native_ops.usable(x)
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
        levels = laplacian_pyramid(fwad.make_dual(x, tangent), 3, check_finite=False)
        for level, expected in zip(levels, laplacian_pyramid(tangent, 3), strict=True):
            assert torch.allclose(fwad.unpack_dual(level).tangent, expected, atol=1e-6)
    stacked = torch.stack([x, tangent])
    batched = vmap(lambda t: pyr_down(t, check_finite=False))(stacked)
    assert torch.allclose(batched, torch.stack([pyr_down(x), pyr_down(tangent)]), atol=1e-6)


def test_the_native_kernels_are_built():
    assert native_ops.available(), "pyrtok/_pyramid_native.c was not built: the install needs a C compiler"
    assert native_ops.isa() in ("avx2+fma", "baseline")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_native_kernels_give_the_elementwise_ops_bits(dtype, rng):
    """Same operations in the same order, fused multiply-adds included: every level, bit for bit."""
    for height in [*range(1, 12), 31, 64, 97]:
        for width in [*range(1, 12), 33, 100]:
            x = torch.randn(2, height, width, generator=rng, dtype=dtype) * 10
            levels = min(3, max_levels(height, width))
            native = laplacian_pyramid(x, levels, check_finite=False)
            ups = [pyr_up(x, (2 * height - a, 2 * width - b), check_finite=False)
                   for a in (0, 1) for b in (0, 1) if 2 * height - a > 0 and 2 * width - b > 0]
            with elementwise():
                portable = laplacian_pyramid(x, levels, check_finite=False)
                portable_ups = [pyr_up(x, up.shape[-2:], check_finite=False) for up in ups]
                portable_back = reconstruct_laplacian(native)
            assert all(torch.equal(a, b) for a, b in zip(native, portable, strict=True)), (height, width)
            assert all(torch.equal(a, b) for a, b in zip(ups, portable_ups, strict=True)), (height, width)
            assert torch.equal(reconstruct_laplacian(native), portable_back), (height, width)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 4), (9, 16), (31, 17), (64, 64)])
def test_the_native_gradients_are_the_elementwise_ops_gradients(size, rng):
    x = torch.rand(3, *size, generator=rng, dtype=torch.float64)
    levels = max_levels(*size)

    def gradients() -> list[torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        pyramid = laplacian_pyramid(leaf, levels)
        weights = [torch.randn(level.shape, generator=torch.Generator().manual_seed(i), dtype=level.dtype)
                   for i, level in enumerate(pyramid)]
        bands = [level.detach().requires_grad_(True) for level in pyramid]
        back = reconstruct_laplacian(bands)
        down = pyr_down(leaf)
        total = sum((level * w).sum() for level, w in zip(pyramid, weights, strict=True))
        total = total + (back * back).sum() + (down * down).sum()
        return torch.autograd.grad(total, [leaf, *bands])

    with elementwise():
        expected = gradients()
    for ours, reference in zip(gradients(), expected, strict=True):
        assert (ours - reference).abs().max().item() <= 1e-12


def test_the_native_path_takes_batched_gradients_wrapped_bands_and_tracing(rng):
    """What the kernels cannot take (vmap-batched gradients, a torch.func-wrapped band, a jit trace) runs on the
    elementwise ops, with their results."""
    from torch.func import grad, vmap

    x = torch.rand(2, 9, 12, generator=rng, dtype=torch.float64)

    def first_band(t: torch.Tensor) -> torch.Tensor:
        return laplacian_pyramid(t, 3, check_finite=False)[0]

    def both_paths(fn):  # fn() on the native path, then on the elementwise ops
        ours = fn()
        with elementwise():
            return ours, fn()

    for ours, reference in [
        both_paths(lambda: torch.autograd.functional.jacobian(first_band, x, vectorize=True)),
        both_paths(lambda: torch.autograd.functional.jacobian(lambda t: pyr_down(t, check_finite=False), x,
                                                              vectorize=True)),
        both_paths(lambda: torch.autograd.functional.jacobian(lambda t: pyr_up(t, (17, 24), check_finite=False),
                                                              x, vectorize=True)),
    ]:
        assert torch.allclose(ours, reference, atol=1e-12)
    pyramid = laplacian_pyramid(x, 3)
    ours, reference = both_paths(lambda: grad(lambda b: reconstruct_laplacian([b, *pyramid[1:]]).square().sum())(
        pyramid[0]))
    assert torch.allclose(ours, reference, atol=1e-12)
    batched = vmap(lambda b: reconstruct_laplacian([b, *pyramid[1:]]))(torch.stack([pyramid[0], pyramid[0] * 2]))
    assert torch.allclose(batched[0], reconstruct_laplacian(pyramid), atol=1e-12)
    traced = torch.jit.trace(lambda t: pyr_down(t, check_finite=False), x.float())
    y = torch.rand(2, 9, 12, generator=rng)
    assert torch.equal(traced(y), pyr_down(y))
