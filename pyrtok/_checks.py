"""Input validation shared by the public functions.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the argument, the value it
got and what was expected, so that a user never meets a bare shape error from deep inside torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_image(x: object, name: str = "x", *, check_finite: bool = True) -> Tensor:
    """Validate an image-like tensor of shape (..., H, W) with a floating dtype.

    Args:
        x: the candidate tensor.
        name: argument name used in error messages.
        check_finite: also reject NaN and infinite values (costs one reduction over ``x``).

    Returns:
        ``x`` itself, unchanged.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., H, W), got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}; "
            f"convert integer images with x.float() / 255"
        )
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    # One summing pass is much cheaper than isfinite(); only a non-finite sum (NaN/inf, or an overflow
    # of huge finite values) pays for the exact element-wise check.
    if check_finite and not bool(torch.isfinite(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values; a pyramid would spread them to every level "
            f"(pass check_finite=False to skip this check)"
        )
    return x


def max_levels(height: int, width: int) -> int:
    """Number of Gaussian pyramid levels an image of ``height`` x ``width`` supports.

    Each level halves the size with ceil rounding, down to a 1 x 1 level, and the original image counts as
    level 0: ``1 + ceil(log2(max(height, width)))``. A 336 x 336 image supports 10 levels
    (336, 168, 84, 42, 21, 11, 6, 3, 2, 1).

    Example:
        >>> max_levels(336, 336)
        10
        >>> max_levels(1, 1)
        1
    """
    for arg, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return 1 + math.ceil(math.log2(max(height, width)))


def check_levels(levels: object, height: int, width: int, name: str = "levels") -> int:
    """Validate a Gaussian/Laplacian level count for an image of ``height`` x ``width``."""
    if isinstance(levels, bool) or not isinstance(levels, int):
        raise TypeError(f"{name} must be an int, got {type(levels).__name__} {levels!r}")
    if levels < 1:
        raise ValueError(f"{name} must be >= 1, got {levels}")
    limit = max_levels(height, width)
    if levels > limit:
        raise ValueError(
            f"{name}={levels} is more than a {height}x{width} image supports; the maximum is {limit}"
        )
    return levels
