"""Bottom-up saliency: spectral residual (Hou and Zhang, 2007) and centre-surround contrast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok._cache import tensor_cache
from pyrtok._checks import check_image, max_levels
from pyrtok.pyramid import gaussian_pyramid
from pyrtok.signals._pool import box_mean, check_batch_image, normalise_map
from pyrtok.tokens import MultiScaleTokens

METHODS = ("spectral_residual", "center_surround", "combined")
SR_WIDTH, SR_SIGMA = 64, 2.5
"""Default working width and blur of :func:`spectral_residual`."""
CENTRES, DELTAS = (1, 2), (2, 3)
"""Default centre levels and centre-surround level gaps of :func:`center_surround`."""


@tensor_cache(maxsize=16)
def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2r + 1,) normalised Gaussian taps, r = ceil(3 sigma); built once per sigma, dtype and device."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps with replicated borders."""
    kernel = _gaussian_kernel(float(sigma), x.dtype, x.device)
    radius = kernel.numel() // 2
    x = rearrange(x, "b h w -> b 1 h w")
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return rearrange(x, "b 1 h w -> b h w")


def spectral_residual(
    image: Tensor, width: int = SR_WIDTH, sigma: float = SR_SIGMA, full_size: bool = True, *, check_finite: bool = True
) -> Tensor:
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
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).

    Returns:
        (B, H, W) map in [0, 1] (or (B, h, width) at working size).
    """
    check_image(image, "image", check_finite=check_finite)
    return _spectral_residual(image.float().mean(1), width, sigma, full_size)


def _spectral_residual(intensity: Tensor, width: int, sigma: float, full_size: bool) -> Tensor:
    """:func:`spectral_residual` of a checked (B, H, W) float intensity map (the channel mean of the image)."""
    height_in, width_in = intensity.shape[-2:]
    height = max(8, round(width * height_in / width_in))
    grey = F.interpolate(rearrange(intensity, "b h w -> b 1 h w"), size=(height, width), mode="area")[:, 0]
    # The FFT treats the image as periodic, so the seam between opposite borders would look like the most
    # salient edge in the picture. A mirror extension is periodic without a seam; the map is cropped back.
    mirrored = torch.cat([grey, grey.flip(-1)], dim=-1)
    mirrored = torch.cat([mirrored, mirrored.flip(-2)], dim=-2)
    spectrum = torch.fft.fft2(mirrored)
    amplitude = spectrum.abs()
    # Flooring at 5% of the mean amplitude keeps exact spectral zeros (flat backgrounds, synthetic
    # scenes) from dominating the residual, which otherwise paints a lattice over the whole map.
    floor = 0.05 * amplitude.flatten(1).mean(1).view(-1, 1, 1) + 1e-12
    log_amplitude = amplitude.add_(floor).log_()  # in place: the amplitude itself is not needed again
    # 3x3 circular mean (the spectrum is periodic): nine shifted views of one circularly padded copy, summed in
    # place, far cheaper than pooling (or nine rolled copies) at this size.
    wrapped = F.pad(log_amplitude, (1, 1, 1, 1), mode="circular")
    rows, cols = log_amplitude.shape[-2:]
    shifted = [wrapped[:, 1 - dy : 1 - dy + rows, 1 - dx : 1 - dx + cols] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    local_mean = shifted[0] + shifted[1]
    for view in shifted[2:]:
        local_mean += view
    residual_amplitude = torch.sub(log_amplitude, local_mean.div_(9), out=local_mean).exp_()
    residual = torch.polar(residual_amplitude, torch.angle(spectrum))
    # Only the quarter that is the image (not its mirror copies) is kept, so only it is squared.
    saliency = _gaussian_blur(torch.fft.ifft2(residual)[:, :height, :width].abs().square_(), sigma)
    if full_size:
        saliency = F.interpolate(saliency.unsqueeze(1), size=(height_in, width_in), mode="bilinear",
                                 align_corners=False)[:, 0]
    return normalise_map(saliency)


def center_surround(
    image: Tensor, centres: tuple[int, ...] = CENTRES, deltas: tuple[int, ...] = DELTAS, *, check_finite: bool = True
) -> Tensor:
    """Centre-surround contrast across Gaussian pyramid levels (intensity and two colour opponents).

    For each centre level c and surround level s = c + delta, the map |G_c - G_s| (G_s upsampled to c)
    is computed for intensity, red-green and blue-yellow channels, normalised to [0, 1], and all maps
    are averaged at the resolution of the finest centre level. Levels beyond what the image supports
    are skipped.

    Args:
        image: (B, C, H, W) images in [0, 1]; grey images use intensity only.
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).

    Returns:
        (B, H, W) map in [0, 1].
    """
    check_image(image, "image", check_finite=check_finite)
    features = _opponent_features(image.float())
    return _center_surround(features, centres, deltas)


def _opponent_features(image: Tensor) -> Tensor:
    """(B, F, H, W) intensity (the channel mean) and, for colour images, red-green and blue-yellow opponents."""
    if image.shape[1] < 3:
        return image.mean(1, keepdim=True)
    features = image.new_empty(image.shape[0], 3, *image.shape[-2:])
    r, g, b = image[:, 0], image[:, 1], image[:, 2]
    # Written straight into their channels: no stacked copy of three full-size maps.
    torch.mean(image, 1, out=features[:, 0])
    torch.sub(r, g, out=features[:, 1])
    torch.add(r, g, out=features[:, 2]).div_(2)
    torch.sub(b, features[:, 2], out=features[:, 2])
    return features


def _center_surround(features: Tensor, centres: tuple[int, ...], deltas: tuple[int, ...]) -> Tensor:
    """:func:`center_surround` of checked (B, F, H, W) float features (see :func:`_opponent_features`)."""
    depth = max_levels(*features.shape[-2:])
    wanted = [(c, c + d) for c in centres for d in deltas if c + d < depth]
    if not wanted:
        wanted = [(0, min(1, depth - 1))]
    pyramid = gaussian_pyramid(features, max(s for _, s in wanted) + 1, check_finite=False)  # checked by callers
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
    total = stack.sub_(low).div_((high - low).clamp_min(1e-12)).sum(1, keepdim=True)  # stack is ours: in place
    total = F.interpolate(total, size=features.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise_map(total)


def saliency_map(image: Tensor, method: str = "combined", *, check_finite: bool = True) -> Tensor:
    """(B, C, H, W) -> (B, H, W) saliency in [0, 1] by ``method`` (one of :data:`METHODS`).

    ``check_finite``: reject NaN/inf images (skip it when the caller has already checked them).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_image(image, "image", check_finite=check_finite)
    if method == "spectral_residual":
        return spectral_residual(image, check_finite=False)
    features = _opponent_features(image.float())
    if method == "center_surround":
        return _center_surround(features, CENTRES, DELTAS)
    # The intensity channel is the grey image spectral residual starts from: computed once for both.
    residual = _spectral_residual(features[:, 0], SR_WIDTH, SR_SIGMA, full_size=True)
    return normalise_map(residual + _center_surround(features, CENTRES, DELTAS))


def saliency(tokens: MultiScaleTokens, image: Tensor, method: str = "combined", *, check_finite: bool = True) -> Tensor:
    """Mean saliency over each token's box.

    Args:
        tokens: N tokens over ``tokens.image_size``.
        image: (B, C, H, W) images in [0, 1] (boxes are rescaled to its size).
        method: ``"spectral_residual"``, ``"center_surround"`` or ``"combined"`` (their normalised sum).
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).

    Returns:
        (B, N) scores in [0, 1].
    """
    check_batch_image(image, tokens, check_finite=check_finite)
    saliency_maps = saliency_map(image, method, check_finite=False)
    height, width = tokens.image_size
    scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height] * 2, device=tokens.box.device)
    return box_mean(saliency_maps, tokens.box * scale)
