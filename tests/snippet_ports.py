"""Ports of the LapLoss snippets that :meth:`pyrtok.losses.LapLoss.from_preset` reproduces, each written from the
file it names; ``tests/test_lap_presets.py`` checks the presets against them and ``benchmarks/bench_laploss.py``
times them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
