"""Pictures of pyramids, drawn with Pillow only (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from pyrtok.tokens import MultiScaleTokens, TokenSelection, check_indexes_tokens

__all__ = ["LEVEL_COLOURS", "MERGED_COLOUR", "band_to_image", "draw_selection", "labelled_grid", "pyramid_figure",
           "save_png", "to_pil"]

#: Outline colour of each pyramid level (index = level, 0 = finest); levels beyond the list reuse it cyclically.
LEVEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red: level 0 (finest)
    (255, 225, 25),  # yellow
    (0, 130, 200),  # blue
    (60, 180, 75),  # green
    (240, 50, 230),  # magenta
    (70, 240, 240),  # cyan
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
)

#: Outline colour of merged tokens (union boxes of what an allocator such as visionzip merged), unlike any level's.
MERGED_COLOUR: tuple[int, int, int] = (255, 255, 255)


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


def labelled_grid(
    rows: Sequence[Sequence[Tensor]], row_labels: Sequence[str], column_labels: Sequence[str], gap: int = 4
) -> Image.Image:
    """A grid of (C, H, W) images in [0, 1] on white, each row named on its left and each column on top.

    Drawn with Pillow's default font. A column is as wide as its widest image or its label, images centred,
    so labels never overlap however small the images are.

    Example:
        >>> grid = labelled_grid([[torch.rand(3, 8, 8)] * 2] * 3, ["original", "masked", "reconstruction"],
        ...                      ["pixel", "laplacian"])
        >>> grid.size[0] > 2 * 8 and grid.size[1] > 3 * 8
        True
    """
    if not rows or not all(rows) or len({len(row) for row in rows}) != 1:
        raise ValueError(f"rows must be a non-empty list of equally long, non-empty lists of images, got lengths "
                         f"{[len(row) for row in rows]}")
    if len(row_labels) != len(rows) or len(column_labels) != len(rows[0]):
        raise ValueError(f"need one label per row and per column ({len(rows)} x {len(rows[0])}), got "
                         f"{len(row_labels)} row_labels and {len(column_labels)} column_labels")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_width = max(size(text)[0] for text in row_labels) + 2 * gap
    label_height = max(size(text)[1] for text in column_labels) + 2 * gap
    widths = [max(max(row[j].shape[-1] for row in rows), size(column_labels[j])[0] + gap)
              for j in range(len(column_labels))]
    heights = [max(im.shape[-2] for im in row) for row in rows]
    canvas = Image.new("RGB", (label_width + sum(widths) + gap * (len(widths) - 1),
                               label_height + sum(heights) + gap * (len(heights) - 1)), "white")
    draw = ImageDraw.Draw(canvas)
    left = label_width
    for text, width in zip(column_labels, widths, strict=True):
        draw.text((left + (width - size(text)[0]) // 2, gap), text, fill="black", font=font)
        left += width + gap
    top = label_height
    for text, row, height in zip(row_labels, rows, heights, strict=True):
        draw.text((gap, top + (height - size(text)[1]) // 2), text, fill="black", font=font)
        left = label_width
        for im, width in zip(row, widths, strict=True):
            canvas.paste(to_pil(im).convert("RGB"), (left + (width - im.shape[-1]) // 2, top))
            left += width + gap
        top += height + gap
    return canvas


def draw_selection(
    image: Tensor,
    tokens: MultiScaleTokens,
    selection: TokenSelection,
    sample: int = 0,
    width: int = 2,
) -> Image.Image:
    """Outline the boxes of the tokens that ``selection`` keeps in one sample, one colour per level.

    The image is blended 35% towards mid-grey so that the outlines read; level l is drawn in
    ``LEVEL_COLOURS[l % len(LEVEL_COLOURS)]``, coarsest level first so that finer outlines lie on top. Merged
    tokens (``selection.merged``) are drawn last as their union boxes, outlined in :data:`MERGED_COLOUR` at
    half the width, so that a box spanning kept tokens still shows theirs.

    Args:
        image: (3, H, W) image in [0, 1] of sample ``sample``. Its size may differ from
            ``tokens.image_size``; boxes (level-0 pixels) are rescaled to it.
        tokens: the N tokens the selection indexes (only the layout is used: box, level, image_size).
        selection: index / mask (B, K) with B = ``tokens.batch_size``.
        sample: which row of the selection to draw, 0 <= sample < B.
        width: outline width in pixels of the output image, >= 1.

    Returns:
        RGB PIL image of size (W, H).

    Example:
        >>> from pyrtok import allocators
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.rand(2, 4, 4, 8), levels=2, patch_size=16)  # 16 + 4 tokens
        >>> selection = allocators.create("pool")(tokens, 6)
        >>> draw_selection(torch.rand(3, 32, 48), tokens, selection, sample=1).size
        (48, 32)
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a (3, H, W) tensor in [0, 1], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image must have shape (3, H, W) (one RGB image, no batch), got {tuple(image.shape)}")
    if not isinstance(tokens, MultiScaleTokens):
        raise TypeError(f"tokens must be MultiScaleTokens, got {type(tokens).__name__}")
    if not isinstance(selection, TokenSelection):
        raise TypeError(f"selection must be a TokenSelection, got {type(selection).__name__}")
    check_indexes_tokens(selection)
    if selection.batch_size != tokens.batch_size:
        raise ValueError(
            f"selection has batch size {selection.batch_size} but tokens have {tokens.batch_size}"
        )
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < selection.batch_size:
        raise ValueError(f"sample must be an int in [0, {selection.batch_size - 1}], got {sample!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    index = selection.index[sample][selection.mask[sample]].cpu()
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < tokens.num_tokens:
        raise ValueError(
            f"selection indexes tokens outside [0, {tokens.num_tokens - 1}]: it does not belong to these tokens"
        )

    picture = to_pil(image).convert("RGB")
    picture = Image.blend(picture, Image.new("RGB", picture.size, (128, 128, 128)), 0.35)
    draw = ImageDraw.Draw(picture)
    out_h, out_w = image.shape[1], image.shape[2]
    scale = torch.tensor([out_w / tokens.image_size[1], out_h / tokens.image_size[0]] * 2)
    boxes = tokens.box.detach().cpu().float()[index] * scale
    levels = tokens.level.cpu()[index]
    for lvl in sorted(set(levels.tolist()), reverse=True):
        colour = LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)]
        for x0, y0, x1, y1 in boxes[levels == lvl].round().long().tolist():
            # Pillow's rectangle includes its far edge, so the last pixel row / column is x1 - 1, y1 - 1.
            x0, y0 = min(max(x0, 0), out_w - 1), min(max(y0, 0), out_h - 1)
            x1, y1 = min(max(x1 - 1, x0), out_w - 1), min(max(y1 - 1, y0), out_h - 1)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    if selection.merged is not None:
        merged = selection.merged
        union = merged.boxes[sample][merged.mask[sample]].detach().cpu().float() * scale
        for x0, y0, x1, y1 in union.round().long().tolist():
            x0, y0 = min(max(x0, 0), out_w - 1), min(max(y0, 0), out_h - 1)
            x1, y1 = min(max(x1 - 1, x0), out_w - 1), min(max(y1 - 1, y0), out_h - 1)
            draw.rectangle((x0, y0, x1, y1), outline=MERGED_COLOUR, width=max(1, width // 2))
    return picture


def save_png(image: Image.Image, path: str) -> None:
    """Save ``image`` as PNG, creating parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")

