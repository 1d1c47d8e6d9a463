"""Laplacian band energy: how much detail of its own scale lies under each token."""

from __future__ import annotations

import torch  # noqa: F401  (the doctest uses it)
from torch import Tensor

from pyrtok._checks import check_image, check_level_count, max_levels
from pyrtok.pyramid import laplacian_pyramid
from pyrtok.signals._pool import check_batch_image, level_box_mean
from pyrtok.tokens import MultiScaleTokens


def band_energy_maps(image: Tensor, levels: int, *, check_finite: bool = True) -> list[Tensor]:
    """Per-pixel energy of the first ``levels`` Laplacian bands: ``levels`` maps (B, H_l, W_l).

    Energy is the squared band value averaged over channels. When the image is too small for ``levels``
    band-pass levels, the last maps come from the low-pass residual, minus its mean (its detail).

    Args:
        image: (B, C, H, W) images.
        levels: number of maps, >= 1 (any number: small images repeat their residual's detail).
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).
    """
    check_level_count(levels)
    check_image(image, "image", check_finite=check_finite)
    depth = min(levels + 1, max_levels(*image.shape[-2:]))
    bands = laplacian_pyramid(image, depth, check_finite=False)
    maps = [band.square().mean(1) for band in bands[:levels]]
    while len(maps) < levels:
        residual = bands[-1] - bands[-1].mean(dim=(-2, -1), keepdim=True)
        maps.append(residual.square().mean(1))
    return maps


def laplacian_energy(
    tokens: MultiScaleTokens, image: Tensor, maps: list[Tensor] | None = None, *, check_finite: bool = True
) -> Tensor:
    """Mean energy of band l of the image's Laplacian pyramid over the box of each level-l token.

    Band l and token level l both sit one octave below level l - 1, so the ordering across levels is the
    same; in absolute terms band l holds detail of about 2^l pixels, while a level-l token spans
    patch * 2^l pixels (log2(patch) octaves coarser). Band energy thus measures how much of the finest
    detail the token's level can still distinguish lies under it.

    Args:
        tokens: N tokens over ``tokens.image_size``.
        image: (B, C, H, W) images in [0, 1]; any size (boxes are rescaled to it).
        maps: optional precomputed ``band_energy_maps(image, k)`` with k >= the number of token levels.
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).

    Returns:
        (B, N) non-negative energies.

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.rand(1, 14, 14, 4), 3, patch_size=16)
        >>> laplacian_energy(tokens, torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 261])
    """
    check_batch_image(image, tokens, check_finite=check_finite)
    if maps is None:
        maps = band_energy_maps(image.float(), tokens.num_levels, check_finite=False)
    if len(maps) < tokens.num_levels:
        raise ValueError(f"maps must hold at least {tokens.num_levels} band energy maps, got {len(maps)}")
    return level_box_mean(maps[: tokens.num_levels], tokens)
