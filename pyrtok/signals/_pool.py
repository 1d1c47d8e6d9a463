"""Per-token pooling of pixel maps over token boxes, with integral images (no loop over tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from pyrtok._checks import check_image
from pyrtok.tokens import MultiScaleTokens


def check_batch_image(
    image: object, tokens: MultiScaleTokens, name: str = "image", *, check_finite: bool = True
) -> Tensor:
    """Validate a (B, C, H, W) image batch that belongs to ``tokens`` (and, by default, holds finite values)."""
    check_image(image, name, check_finite=check_finite)
    if image.dim() != 4 or image.shape[0] != tokens.batch_size:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with B = {tokens.batch_size} (the tokens' batch), "
            f"got {tuple(image.shape)}"
        )
    return image


def _integral_images(maps: Sequence[Tensor]) -> Tensor:
    """Integral images of (B, H_l, W_l) maps in float64, each zero-bordered to (H_l + 1, W_l + 1), flattened and
    concatenated: (B, sum_l (H_l + 1)(W_l + 1))."""
    sizes = [(m.shape[-2] + 1) * (m.shape[-1] + 1) for m in maps]
    flat = maps[0].new_zeros(maps[0].shape[0], sum(sizes), dtype=torch.float64)
    for part, m in zip(flat.split(sizes, dim=1), maps, strict=True):
        # Cumulative sums taken in place inside the zero border: the same sums as a padded copy of
        # cumsum(1).cumsum(2), without strided scans into fresh tensors.
        rearrange(part, "b (h w) -> b h w", w=m.shape[-1] + 1)[:, 1:, 1:].copy_(m).cumsum_(1).cumsum_(2)
    return flat


# Columns of (x0, y0, x1, y1) that give, as (x, y), the box corners the integral-image sum reads:
# (x1, y1) - (x1, y0) - (x0, y1) + (x0, y0).
_CORNERS = (2, 3, 2, 1, 0, 3, 0, 1)


def _box_sums(integral: Tensor, boxes: Tensor, size: Tensor, offset: Tensor | int = 0) -> Tensor:
    """Means over (M, 4) boxes read from flat integral images (see :func:`_integral_images`).

    ``size`` (M, 2) or (2,) is the (W, H) of each box's map and ``offset`` ((M, 1) or an int) where that map's
    integral image starts in the flat buffer. Edges are rounded outwards and every box covers at least one pixel.
    Returns (B, M) float64.
    """
    low = boxes[:, :2].floor().long().clamp_min(0).minimum(size - 1)  # (M, 2) as (x, y)
    high = boxes[:, 2:].ceil().long().clamp_min(1).minimum(size).maximum(low + 1)
    corners = rearrange(torch.cat([low, high], 1)[:, _CORNERS], "m (c xy) -> xy m c", xy=2)  # (2, M, 4)
    # Flat position offset + y * (W + 1) + x of every corner; one gather reads all four of every box.
    index = corners[1] * (size[..., :1] + 1) + corners[0] + offset
    values = rearrange(integral[:, index.flatten()], "b (m c) -> c b m", c=4)
    total = values[0] - values[1] - values[2] + values[3]
    return total / (high - low).prod(1).to(total.dtype)


def box_mean(maps: Tensor, boxes: Tensor) -> Tensor:
    """Mean of each (B, H, W) map over each box.

    Args:
        maps: (B, H, W) float maps.
        boxes: (M, 4) ``(x0, y0, x1, y1)`` in the maps' pixel coordinates; edges are rounded outwards and
            every box covers at least one pixel.

    Returns:
        (B, M) box means.
    """
    height, width = maps.shape[-2:]
    size = torch.tensor([width, height], device=boxes.device)
    return _box_sums(_integral_images([maps]), boxes, size).to(maps.dtype)


def level_box_mean(maps: Sequence[Tensor], tokens: MultiScaleTokens) -> Tensor:
    """Pool ``maps[l]`` (B, H_l, W_l) over the boxes of the level-l tokens; returns (B, N).

    All levels share one integral-image buffer and one gather, so the cost hardly grows with the level count.
    """
    height, width = tokens.image_size
    maps = list(maps[: tokens.num_levels])
    device = tokens.box.device
    # Per level: the box scale from level-0 pixels to the map, the map's (W, H), and its integral image's offset.
    scale = torch.tensor([[m.shape[-1] / width, m.shape[-2] / height] for m in maps], device=device)
    size = torch.tensor([[m.shape[-1], m.shape[-2]] for m in maps], device=device)
    starts = [0]
    for m in maps[:-1]:
        starts.append(starts[-1] + (m.shape[-2] + 1) * (m.shape[-1] + 1))
    offset = torch.tensor(starts, device=device)
    level = tokens.level
    boxes = tokens.box * scale[level].repeat(1, 2)
    means = _box_sums(_integral_images(maps), boxes, size[level], offset[level, None])
    return means.to(device=tokens.device, dtype=maps[0].dtype)


def normalise_map(saliency: Tensor) -> Tensor:
    """Rescale each (B, H, W) map to [0, 1] (a constant map becomes all zeros)."""
    # amin/amax, not min/max: the latter also find the indices, which costs twice the reduction itself.
    low = saliency.amin(dim=(-2, -1), keepdim=True)
    high = saliency.amax(dim=(-2, -1), keepdim=True)
    return (saliency - low) / (high - low).clamp_min(1e-12)
