"""Input validation shared by the public functions.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the argument, the value it
got and what was expected, so that a user never meets a bare shape error from deep inside torch.
"""

from __future__ import annotations

import math
import numbers

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


def check_level_count(
    levels: object,
    name: str = "levels",
    *,
    maximum: int | None = None,
    size: tuple[int, int] | None = None,
    what: str = "image",
    rule: str = "",
    optional: bool = False,
) -> int | None:
    """Validate a number of pyramid levels: an int >= 1, and at most ``maximum`` when one is given.

    The one levels check of the package; :func:`check_levels` adds the Gaussian-pyramid maximum of an image.

    Args:
        levels: the candidate value.
        name: argument name used in error messages.
        maximum: largest allowed value, if any.
        size: (height, width) the maximum comes from, named in the error (``what`` says of what).
        what: what ``size`` measures: "image", "grid", ...
        rule: how the maximum follows from the size, appended to the error (e.g. "floor(log2(min side)) - 2").
        optional: also accept None (and return it).

    Returns:
        ``levels`` as an int (None when ``optional`` and ``levels`` is None).

    Example:
        >>> check_level_count(3, maximum=4)
        3
        >>> check_level_count(5, maximum=4, size=(8, 8))
        Traceback (most recent call last):
        ...
        ValueError: levels must be an int in [1, 4], got 5; the maximum is 4 for a 8x8 image
    """
    if optional and levels is None:
        return None
    expected = "an int >= 1" if maximum is None else f"an int in [1, {maximum}]"
    if size is not None:
        expected += f" for a {size[0]}x{size[1]} {what}"
    if optional:
        expected += " or None"
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(levels).__name__} {levels!r}")
    if levels < 1:
        detail = "" if expected == "an int >= 1" else f" ({expected})"
        raise ValueError(f"{name} must be >= 1{detail}, got {levels}")
    if maximum is not None and levels > maximum:
        where = "" if size is None else f" for a {size[0]}x{size[1]} {what}"
        why = f" ({rule})" if rule else ""
        raise ValueError(f"{name} must be an int in [1, {maximum}], got {levels}; the maximum is {maximum}{where}{why}")
    return int(levels)


def check_levels(levels: object, height: int, width: int, name: str = "levels", *, what: str = "image") -> int:
    """Validate a Gaussian/Laplacian level count for an image (or patch grid) of ``height`` x ``width``.

    The maximum is :func:`max_levels`: halving with ceil rounding down to 1 x 1.

    Example:
        >>> check_levels(4, 14, 14, what="grid")
        4
    """
    return check_level_count(levels, name, maximum=max_levels(height, width), size=(height, width), what=what)
