"""Bottom-up saliency: spectral residual (Hou and Zhang, 2007) and centre-surround contrast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok._checks import check_image, max_levels
from pyrtok.pyramid import gaussian_pyramid
from pyrtok.signals._pool import box_mean, check_batch_image, normalise_map
from pyrtok.tokens import MultiScaleTokens

METHODS = ("spectral_residual", "center_surround", "combined")


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = rearrange(x, "b h w -> b 1 h w")
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return rearrange(x, "b 1 h w -> b h w")


def spectral_residual(image: Tensor, width: int = 64, sigma: float = 2.5, full_size: bool = True) -> Tensor:
    """Spectral-residual saliency map.

    The image is converted to grey and resized to ``width`` columns (the scale the method was designed
    at). The log-amplitude spectrum minus its 3x3 local mean (the "residual", what is unexpected given
    the typical 1/f spectrum) is recombined with the original phase, inverted, squared, and blurred.
    Amplitudes are floored at 5% of their mean before the log, and the image is mirror-extended before
    the FFT so that its borders do not read as edges (see the code comments).

    Args:
        image: (B, C, H, W) images in [0, 1].
        width: working width in pixels.
        sigma: blur of the squared map at working scale, in pixels.
        full_size: return the map at the input's size (else at the working size).

    Returns:
        (B, H, W) map in [0, 1] (or (B, h, width) at working size).
    """
    check_image(image, "image")
    height_in, width_in = image.shape[-2:]
    height = max(8, round(width * height_in / width_in))
    grey = F.interpolate(image.float().mean(1, keepdim=True), size=(height, width), mode="area")[:, 0]
    # The FFT treats the image as periodic, so the seam between opposite borders would look like the most
    # salient edge in the picture. A mirror extension is periodic without a seam; the map is cropped back.
    mirrored = torch.cat([grey, grey.flip(-1)], dim=-1)
    mirrored = torch.cat([mirrored, mirrored.flip(-2)], dim=-2)
    spectrum = torch.fft.fft2(mirrored)
    amplitude = spectrum.abs()
    # Flooring at 5% of the mean amplitude keeps exact spectral zeros (flat backgrounds, synthetic
    # scenes) from dominating the residual, which otherwise paints a lattice over the whole map.
    floor = 0.05 * amplitude.flatten(1).mean(1).view(-1, 1, 1) + 1e-12
    log_amplitude = torch.log(amplitude + floor)
    # 3x3 circular mean (the spectrum is periodic), as nine shifted copies: far cheaper than pooling here.
    local_mean = sum(log_amplitude.roll((dy, dx), dims=(-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    residual = torch.polar(torch.exp(log_amplitude - local_mean), torch.angle(spectrum))
    saliency = _gaussian_blur(torch.fft.ifft2(residual).abs().square()[:, :height, :width], sigma)
    if full_size:
        saliency = F.interpolate(saliency.unsqueeze(1), size=(height_in, width_in), mode="bilinear",
                                 align_corners=False)[:, 0]
    return normalise_map(saliency)


def center_surround(image: Tensor, centres: tuple[int, ...] = (1, 2), deltas: tuple[int, ...] = (2, 3)) -> Tensor:
    """Centre-surround contrast across Gaussian pyramid levels (intensity and two colour opponents).

    For each centre level c and surround level s = c + delta, the map |G_c - G_s| (G_s upsampled to c)
    is computed for intensity, red-green and blue-yellow channels, normalised to [0, 1], and all maps
    are averaged at the resolution of the finest centre level. Levels beyond what the image supports
    are skipped.

    Args:
        image: (B, C, H, W) images in [0, 1]; grey images use intensity only.

    Returns:
        (B, H, W) map in [0, 1].
    """
    check_image(image, "image")
    image = image.float()
    intensity = image.mean(1)
    channels = [intensity]
    if image.shape[1] >= 3:
        r, g, b = image[:, 0], image[:, 1], image[:, 2]
        channels += [r - g, b - (r + g) / 2]
    features = torch.stack(channels, 1)  # (B, F, H, W)
    depth = max_levels(*image.shape[-2:])
    wanted = [(c, c + d) for c in centres for d in deltas if c + d < depth]
    if not wanted:
        wanted = [(0, min(1, depth - 1))]
    pyramid = gaussian_pyramid(features, max(s for _, s in wanted) + 1)
    out_size = pyramid[min(c for c, _ in wanted)].shape[-2:]
    contrasts = []
    for centre, surround in wanted:
        surround_up = F.interpolate(pyramid[surround], size=pyramid[centre].shape[-2:], mode="bilinear",
                                    align_corners=False)
        contrast = (pyramid[centre] - surround_up).abs()
        if contrast.shape[-2:] != out_size:
            contrast = F.interpolate(contrast, size=out_size, mode="bilinear", align_corners=False)
        contrasts.append(contrast)
    # Normalise every (scale pair, feature) map to [0, 1] at once, then sum them.
    stack = torch.cat(contrasts, dim=1)
    low = stack.amin(dim=(-2, -1), keepdim=True)
    high = stack.amax(dim=(-2, -1), keepdim=True)
    total = ((stack - low) / (high - low).clamp_min(1e-12)).sum(1, keepdim=True)
    total = F.interpolate(total, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise_map(total)


def saliency_map(image: Tensor, method: str = "combined") -> Tensor:
    """(B, C, H, W) -> (B, H, W) saliency in [0, 1] by ``method`` (one of :data:`METHODS`)."""
    if method == "spectral_residual":
        return spectral_residual(image)
    if method == "center_surround":
        return center_surround(image)
    if method == "combined":
        return normalise_map(spectral_residual(image) + center_surround(image))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def saliency(tokens: MultiScaleTokens, image: Tensor, method: str = "combined") -> Tensor:
    """Mean saliency over each token's box.

    Args:
        tokens: N tokens over ``tokens.image_size``.
        image: (B, C, H, W) images in [0, 1] (boxes are rescaled to its size).
        method: ``"spectral_residual"``, ``"center_surround"`` or ``"combined"`` (their normalised sum).

    Returns:
        (B, N) scores in [0, 1].
    """
    check_batch_image(image, tokens)
    saliency_maps = saliency_map(image, method)
    height, width = tokens.image_size
    scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height] * 2, device=tokens.box.device)
    return box_mean(saliency_maps, tokens.box * scale)
