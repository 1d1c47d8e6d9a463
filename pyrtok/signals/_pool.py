"""Per-token pooling of pixel maps over token boxes, with integral images (no loop over tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok._checks import check_image
from pyrtok.tokens import MultiScaleTokens


def check_batch_image(image: object, tokens: MultiScaleTokens, name: str = "image") -> Tensor:
    """Validate a (B, C, H, W) image batch that belongs to ``tokens``."""
    check_image(image, name)
    if image.dim() != 4 or image.shape[0] != tokens.batch_size:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with B = {tokens.batch_size} (the tokens' batch), "
            f"got {tuple(image.shape)}"
        )
    return image


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
    integral = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, H+1, W+1)
    x0 = boxes[:, 0].floor().long().clamp(0, width - 1)
    y0 = boxes[:, 1].floor().long().clamp(0, height - 1)
    x1 = torch.maximum(boxes[:, 2].ceil().long().clamp(1, width), x0 + 1)
    y1 = torch.maximum(boxes[:, 3].ceil().long().clamp(1, height), y0 + 1)
    flat = integral.flatten(1)
    stride = width + 1

    def at(y: Tensor, x: Tensor) -> Tensor:
        return flat[:, y * stride + x]

    total = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    area = ((x1 - x0) * (y1 - y0)).to(total.dtype)
    return (total / area).to(maps.dtype)


def level_box_mean(maps: Sequence[Tensor], tokens: MultiScaleTokens) -> Tensor:
    """Pool ``maps[l]`` (B, H_l, W_l) over the boxes of the level-l tokens; returns (B, N)."""
    height, width = tokens.image_size
    out = tokens.features.new_zeros(tokens.batch_size, tokens.num_tokens, dtype=maps[0].dtype)
    for lvl, level_slice in enumerate(tokens.level_slices):
        scale = torch.tensor(
            [maps[lvl].shape[-1] / width, maps[lvl].shape[-2] / height] * 2, device=tokens.box.device
        )
        out[:, level_slice] = box_mean(maps[lvl], tokens.box[level_slice] * scale)
    return out


def normalise_map(saliency: Tensor) -> Tensor:
    """Rescale each (B, H, W) map to [0, 1] (a constant map becomes all zeros)."""
    flat = saliency.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1)
    return (saliency - low) / (high - low).clamp_min(1e-12)
