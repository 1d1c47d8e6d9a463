"""LapLoss presets against ports of the snippets they name: the same loss and gradients within 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyrtok.lap_presets import PRESETS, snippet_pyramid
from pyrtok.losses import LapLoss, laplacian_band_errors

# -- ports ----------------------------------------------------------------------------------------------------


def rife_lap_loss(input: torch.Tensor, target: torch.Tensor, max_levels: int = 5) -> torch.Tensor:
    """hzwer/ECCV2022-RIFE at 5d8adbd, model/laplacian.py (the whole file: ``gauss_kernel``, ``downsample``,
    ``upsample``, ``conv_gauss``, ``laplacian_pyramid``, ``LapLoss.forward``), ported without its global device."""
    def gauss_kernel(channels=3):
        kernel = torch.tensor([[1., 4., 6., 4., 1], [4., 16., 24., 16., 4.], [6., 24., 36., 24., 6.],
                               [4., 16., 24., 16., 4.], [1., 4., 6., 4., 1.]])
        kernel /= 256.
        return kernel.repeat(channels, 1, 1, 1)

    def conv_gauss(img, kernel):
        img = torch.nn.functional.pad(img, (2, 2, 2, 2), mode='reflect')
        return torch.nn.functional.conv2d(img, kernel, groups=img.shape[1])

    def upsample(x):
        cc = torch.cat([x, torch.zeros(x.shape[0], x.shape[1], x.shape[2], x.shape[3])], dim=3)
        cc = cc.view(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3])
        cc = cc.permute(0, 1, 3, 2)
        cc = torch.cat([cc, torch.zeros(x.shape[0], x.shape[1], x.shape[3], x.shape[2] * 2)], dim=3)
        cc = cc.view(x.shape[0], x.shape[1], x.shape[3] * 2, x.shape[2] * 2)
        x_up = cc.permute(0, 1, 3, 2)
        return conv_gauss(x_up, 4 * gauss_kernel(channels=x.shape[1]))

    def laplacian_pyramid(img, kernel, max_levels=3):
        current, pyr = img, []
        for _ in range(max_levels):
            filtered = conv_gauss(current, kernel)
            down = filtered[:, :, ::2, ::2]
            up = upsample(down)
            pyr.append(current - up)
            current = down
        return pyr

    kernel = gauss_kernel(channels=input.shape[1])
    pyr_input = laplacian_pyramid(img=input, kernel=kernel, max_levels=max_levels)
    pyr_target = laplacian_pyramid(img=target, kernel=kernel, max_levels=max_levels)
    return sum(torch.nn.functional.l1_loss(a, b) for a, b in zip(pyr_input, pyr_target, strict=True))


def _gauss_sum_kernel(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    """The kernel both mtyka/laploss (``gauss_kernel``) and minimal_glo (``build_gauss_kernel``) build."""
    grid = np.float32(np.mgrid[0:size, 0:size].T)
    gaussian = lambda x: np.exp((x - size // 2) ** 2 / (-2 * sigma**2)) ** 2  # noqa: E731
    kernel = np.sum(gaussian(grid), axis=2)
    kernel /= np.sum(kernel)
    return kernel


def glo_lap_loss(input: torch.Tensor, target: torch.Tensor, max_levels: int = 5) -> torch.Tensor:
    """tneumann/minimal_glo at bbb68d2, glo.py lines 19-73 (``build_gauss_kernel``, ``conv_gauss``,
    ``laplacian_pyramid``, ``LapLoss`` with its defaults k_size 5, sigma 2.0, max_levels 5), ported."""
    n_channels = input.shape[1]
    kernel = torch.FloatTensor(np.tile(_gauss_sum_kernel(5, 2.0), (n_channels, 1, 1))[:, None, :, :])

    def conv_gauss(img):
        img = F.pad(img, (2, 2, 2, 2), mode='replicate')
        return F.conv2d(img, kernel, groups=n_channels)

    def laplacian_pyramid(img):
        current, pyr = img, []
        for _ in range(max_levels):
            filtered = conv_gauss(current)
            pyr.append(current - filtered)
            current = F.avg_pool2d(filtered, 2)
        pyr.append(current)
        return pyr

    return sum(F.l1_loss(a, b) for a, b in zip(laplacian_pyramid(input), laplacian_pyramid(target), strict=True))


def mtyka_lap_loss(img1: torch.Tensor, img2: torch.Tensor, max_levels: int = 3) -> torch.Tensor:
    """mtyka/laploss at 7a1025e, laploss.py (``conv_gauss`` with ``padding='SAME'``: zeros; ``make_laplacian_pyramid``
    with sigma 2.0 and ``avg_pool`` 2 x 2 ``VALID``; ``laploss``: per level the L1 norm over the element count,
    summed, times the batch size), ported from TensorFlow's NHWC to NCHW."""
    channels = img1.shape[1]
    kernel = torch.from_numpy(_gauss_sum_kernel(5, 2.0))[None, None].repeat(channels, 1, 1, 1)

    def pyramid(img):
        current, pyr = img, []
        for _ in range(max_levels):
            gauss = F.conv2d(current, kernel, padding=2, groups=channels)
            pyr.append(current - gauss)
            current = F.avg_pool2d(gauss, 2)
        pyr.append(current)
        return pyr

    losses = [torch.sum(torch.abs(a - b)) / a.numel() for a, b in zip(pyramid(img1), pyramid(img2), strict=True)]
    return torch.stack(losses).sum() * img1.shape[0]


PORTS = {"rife": rife_lap_loss, "glo": glo_lap_loss, "mtyka": mtyka_lap_loss}
SIZES = {"rife": [(64, 96), (128, 64)], "glo": [(45, 67), (64, 64)], "mtyka": [(37, 50), (48, 32)]}


@pytest.mark.parametrize("name", sorted(PORTS))
@pytest.mark.parametrize("which", [0, 1])
def test_each_preset_is_its_snippet_in_value_and_gradient(name, which):
    height, width = SIZES[name][which]
    g = torch.Generator().manual_seed(which)
    pred = torch.rand(3, 3, height, width, generator=g, requires_grad=True)
    target = torch.rand(3, 3, height, width, generator=g)
    ours = LapLoss.from_preset(name)(pred, target)
    (ours_grad,) = torch.autograd.grad(ours, pred)
    reference = PORTS[name](pred, target)
    (reference_grad,) = torch.autograd.grad(reference, pred)
    assert abs(ours.item() - reference.item()) <= 1e-6
    assert (ours_grad - reference_grad).abs().max().item() <= 1e-6


def test_the_snippets_disagree_and_the_structure_is_theirs():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    values = {name: float(LapLoss.from_preset(name)(pred, target)) for name in PORTS}
    assert len({round(v, 3) for v in values.values()}) == 3  # three different losses on the same input
    assert [tuple(level.shape[-2:]) for level in snippet_pyramid(pred, PRESETS["glo"])] == \
        [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(snippet_pyramid(pred, PRESETS["mtyka"])) == 4  # 3 bands and the residual


def test_rife_sides_need_a_multiple_of_32_unless_cropped():
    g = torch.Generator().manual_seed(6)
    odd = torch.rand(1, 3, 101, 150, generator=g), torch.rand(1, 3, 101, 150, generator=g)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*bands = 32.*any_size=True"):
        LapLoss.from_preset("rife")(*odd)
    cropped = LapLoss.from_preset("rife", any_size=True)
    assert torch.isfinite(cropped(*odd))
    even = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    assert float(cropped(*even)) == float(LapLoss.from_preset("rife")(*even))  # the same where the snippet runs
    with pytest.raises(ValueError, match="sides >= 48, so that reflect padding fits"):
        LapLoss.from_preset("rife")(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_switches_residual_and_mask():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    plain = LapLoss.from_preset("rife")
    with_residual = LapLoss.from_preset("rife", residual=True)
    residual = (snippet_pyramid(pred - target, with_residual.snippet)[-1]).abs().mean()
    assert abs(float(with_residual(pred, target)) - float(plain(pred, target)) - float(residual)) <= 1e-6
    ones = torch.ones(2, 1, 64, 64)
    for name in PORTS:
        loss = LapLoss.from_preset(name)
        assert abs(float(loss(pred, target, ones)) - float(loss(pred, target))) <= 1e-6
    half = ones.clone()
    half[..., 32:] = 0
    # a change where the mask is zero (beyond the blur's reach) leaves the finest level's error as it was
    far = pred.clone()
    far[..., 40:] += 5.0
    snippet = LapLoss.from_preset("glo").snippet
    near = laplacian_band_errors(pred, target, mask=half, snippet=snippet)
    moved = laplacian_band_errors(far, target, mask=half, snippet=snippet)
    assert near.shape == (2, 6) and torch.equal(near[:, 0], moved[:, 0]) and not torch.equal(near, moved)
    unmasked = laplacian_band_errors(far, target, snippet=snippet)
    assert bool((unmasked[:, 0] > near[:, 0]).all())
    with pytest.raises(ValueError, match="preset must be one of"):
        LapLoss.from_preset("kornia")
    assert "preset='mtyka'" in repr(LapLoss.from_preset("mtyka"))
