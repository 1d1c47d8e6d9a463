"""Images as the project loads them: one conversion to tensors and one loader that every path uses.

The ablation runner and the lmms-eval plugin both open images with :func:`open_image` and hand them to
:class:`~pyrtok.vlm.PyramidVLM`, whose model family turns them into the pixels the model sees, so the same
model sees the same pixels through either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["image_tensor", "load_image", "open_image"]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) as a contiguous (3, H, W) float32 tensor in [0, 1], RGB.

    Example:
        >>> image_tensor(Image.new("L", (4, 2), 255)).shape
        torch.Size([3, 2, 4])
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL image or an image file as an RGB PIL image (the file read and closed).

    A missing file raises ``FileNotFoundError``, one Pillow cannot read ``ValueError``; both name the file.

    Example:
        >>> open_image(Image.new("L", (4, 2))).mode
        'RGB'
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise FileNotFoundError(f"image file {str(path)!r} {what}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            # Pillow names the file when it cannot identify it, not when it is truncated or too large
            message = str(error) if str(path) in str(error) else f"image file {str(path)!r}: {error}"
            raise ValueError(message) from error
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a file path, got {type(image).__name__}")
    return image.convert("RGB")


def load_image(image: Image.Image | str | Path, size: int | None = None) -> torch.Tensor:
    """A PIL image or an image file as a (3, H, W) float32 tensor in [0, 1], RGB.

    With ``size``, the image is first resized to ``size`` x ``size`` with PIL's bicubic filter (LLaVA-1.5's
    square input).

    Example:
        >>> load_image(Image.new("RGB", (70, 100)), size=8).shape
        torch.Size([3, 8, 8])
    """
    image = open_image(image)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        image = image.resize((size, size), Image.BICUBIC)
    return image_tensor(image)
