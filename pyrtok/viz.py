"""Pictures of pyramids, drawn with Pillow only (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

__all__ = ["band_to_image", "pyramid_figure", "save_png", "to_pil"]


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) or (H, W) tensor in [0, 1] -> 8-bit PIL image (values are clipped)."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (H, W), (1, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def band_to_image(band: Tensor) -> Tensor:
    """Map a zero-centred band-pass image to [0, 1] for display: 0.5 + band / (6 std), clipped later.

    Band-pass images are heavy-tailed; scaling by the maximum would leave them a flat grey.
    """
    band = band.detach().float()
    scale = (3 * band.std()).clamp_min(1e-8)
    return 0.5 + band / (2 * scale)


def pyramid_figure(rows: Sequence[Sequence[Tensor]], gap: int = 4) -> Image.Image:
    """Lay out rows of (C, H, W) images in [0, 1] left to right, each at its own size, on white.

    Example:
        >>> from pyrtok.pyramid import gaussian_pyramid
        >>> pyramid_figure([gaussian_pyramid(torch.rand(3, 64, 64), 3)]).size
        (120, 64)
    """
    if not rows or not all(rows):
        raise ValueError("rows must be a non-empty list of non-empty lists of images")
    widths = [sum(im.shape[-1] for im in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(im.shape[-2] for im in row) for row in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), "white")
    top = 0
    for row, height in zip(rows, heights, strict=True):
        left = 0
        for im in row:
            canvas.paste(to_pil(im).convert("RGB"), (left, top))
            left += im.shape[-1] + gap
        top += height + gap
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    """Save ``image`` as PNG, creating parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")

