"""PIL images to tensors: the one conversion every loader of the project uses."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["image_tensor"]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) as a contiguous (3, H, W) float32 tensor in [0, 1], RGB.

    Example:
        >>> image_tensor(Image.new("L", (4, 2), 255)).shape
        torch.Size([3, 2, 4])
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
