"""Gaussian and Laplacian image pyramids with the classic Burt-Adelson operator.

The operator is the one OpenCV implements in ``cv2.pyrDown`` / ``cv2.pyrUp``, reproduced to float32
rounding for every image size down to 1 pixel:

- ``pyr_down``: separable 5-tap binomial blur [1, 4, 6, 4, 1] / 16 with reflect-101 borders
  (``dcb|abcd|cba``), then every other sample; a side of n becomes ceil(n / 2).
- ``pyr_up``: zero-insertion onto the doubled grid, reflect-101 borders *on that grid*, blur with 4x the
  kernel, then a crop to the requested size (2n or 2n - 1 per side).

Both are computed in polyphase form (no multiply by inserted zeros): along one axis the doubled grid
gives ``even[i] = (s[i-1] + 6 s[i] + s[i+1]) / 8`` and ``odd[i] = (s[i] + s[i+1]) / 2``, where the
reflection on the doubled grid means ``s[-1] = s[1]`` and ``s[n] = s[n-1]``. Normalisation constants are
folded into one multiply at the end, which the Laplacian fuses into its subtraction.

Speed: on a CPU, float32 and float64 stacks (leading dimensions flattened) run on native kernels
(``pyrtok/_pyramid_native.c``, built at install where a C compiler is found): one pass per output row, split
over torch's thread count. GPUs, builds without the kernels, ``torch.compile`` and the ``torch.func``
transforms run the polyphase taps as torch's elementwise ops. Both paths give the same bits, so an image's
levels are the same alone or in any batch; ``elementwise()`` forces the portable path.

Tensors are (..., H, W): any leading dimensions ((H, W), (B, C, H, W), video (B, T, C, H, W)).
float16 and bfloat16 inputs are computed in float32 and returned in their own dtype. Everything is
differentiable and runs on any device torch supports.

Non-finite values: the public functions reject NaN and infinity by default, because the blur spreads a
single bad pixel over its neighbourhood at every level and the result is silently meaningless. Pass
``check_finite=False`` to skip the check (one reduction over the input) in hot loops.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pyrtok import _pyramid_native_ops as native_ops
from pyrtok._checks import check_image, check_level_count, check_levels, max_levels

__all__ = [
    "GaussianPyramid",
    "LaplacianPyramid",
    "elementwise",
    "gaussian_pyramid",
    "laplacian_pyramid",
    "max_levels",
    "pyr_down",
    "pyr_up",
    "reconstruct_laplacian",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _work_dtype(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _reflect101_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of a reflect-101 padded axis of length n, valid for any n >= 1 (torch's pad needs n > pad)."""
    idx = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * n - 2
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _taps_down(p: Tensor, dim: int, m: int) -> Tensor:
    """Unnormalised [1, 4, 6, 4, 1] filter sampled at every other position of padded axis ``dim``."""

    def tap(offset: int) -> Tensor:
        index = [slice(None)] * p.dim()
        index[dim] = slice(offset, offset + 2 * m, 2)
        return p[tuple(index)]

    out = tap(0) + tap(4)
    out.add_(tap(1) + tap(3), alpha=4)
    return out.add_(tap(2), alpha=6)


_ELEMENTWISE: contextvars.ContextVar[bool] = contextvars.ContextVar("pyrtok_pyramid_elementwise", default=False)


@contextlib.contextmanager
def elementwise() -> Iterator[None]:
    """Run every pyramid operator on torch's elementwise ops, the portable path, instead of the native kernels.

    The native CPU kernels and the elementwise ops give the same bits, so this changes speed, not results: it
    is the baseline ``benchmarks/bench_pyramid.py`` measures the kernels against, and what a build without
    them runs. The setting is a context variable: it holds in this thread and in the tasks it starts, not in
    threads started inside the block.

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> with elementwise():
        ...     portable = laplacian_pyramid(x, 3)
        >>> all(torch.equal(a, b) for a, b in zip(portable, laplacian_pyramid(x, 3)))
        True
    """
    token = _ELEMENTWISE.set(True)
    try:
        yield
    finally:
        _ELEMENTWISE.reset(token)


def _native(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the (N, H, W) stack ``x``, with ``others`` (a base, or None), takes the native kernels (the one
    place this is decided)."""
    return not _ELEMENTWISE.get() and native_ops.usable(x, *others)


def _down(x: Tensor) -> Tensor:
    """(N, H, W) -> (N, ceil(H/2), ceil(W/2)), the OpenCV pyrDown operator."""
    if _native(x):
        return native_ops.down(x)
    h, w = x.shape[-2:]
    mh, mw = (h + 1) // 2, (w + 1) // 2
    # Left pad 2, right pad so that the last output centre 2m - 2 has its two right neighbours.
    ph, pw = 2 * mh - h + 1, 2 * mw - w + 1
    if h > 2 and w > 2:
        padded = F.pad(x, (2, pw, 2, ph), mode="reflect")
    else:
        padded = x.index_select(-2, _reflect101_index(h, 2, ph, x.device))
        padded = padded.index_select(-1, _reflect101_index(w, 2, pw, x.device))
    out = _taps_down(_taps_down(padded, -2, mh), -1, mw)
    return out.mul_(1.0 / 256.0)


def _up(x: Tensor, size: tuple[int, int], base: Tensor | None = None, alpha: float = 1.0 / 64.0) -> Tensor:
    """(N, h, w) -> (N, *size): ``base + alpha * 64 pyrUp(x)``, or ``alpha * 64 pyrUp(x)`` without a base.

    The Laplacian (alpha -1/64) and its inverse (+1/64) fuse their subtraction or addition into this call.
    """
    if _native(x, base):
        return native_ops.up(x, size, base, alpha)
    unscaled = _up_unscaled(x, size)
    return unscaled.mul_(alpha) if base is None else torch.add(base, unscaled, alpha=alpha)


def _up_unscaled(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> 64 x the OpenCV pyrUp of x, cropped to ``size`` (the caller divides by 64)."""
    h, w = x.shape[-2:]
    # Replicate gives s[n] = s[n-1] on the right; the left border of the doubled grid needs s[-1] = s[1].
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    if h > 1:
        p[:, 0, :] = p[:, 2, :]
    if w > 1:
        p[:, :, 0] = p[:, :, 2]
    # Autograd cannot record out= writes; without it, both phases go straight into one strided buffer.
    # Under torch.compile the functional form is better: the compiler fuses it, out= views would break it.
    direct = not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()

    def interleave(prev: Tensor, centre: Tensor, nxt: Tensor, dim: int, pattern: str) -> Tensor:
        if direct:
            shape = list(prev.shape)
            shape.insert(dim, 2)
            both = prev.new_empty(shape)
            even, odd = both.select(dim, 0), both.select(dim, 1)
            torch.add(prev, nxt, out=even).add_(centre, alpha=6)
            torch.add(centre, nxt, out=odd).mul_(4)
        else:
            even = (prev + nxt).add_(centre, alpha=6)
            odd = (centre + nxt).mul_(4)
            # Stacking right after the interleaved axis makes the merge below a view, not a copy.
            both = torch.stack([even, odd], dim=dim)
        return rearrange(both, pattern)

    # Columns first, on the small grid: their phases interleave element by element (strided writes), the rows'
    # in whole rows, so the strided pass gets half the samples it would get after the rows double.
    cols = interleave(p[..., :w], p[..., 1 : w + 1], p[..., 2 : w + 2], 3, "n h w two -> n h (w two)")
    full = interleave(cols[:, :h], cols[:, 1 : h + 1], cols[:, 2 : h + 2], 2, "n h two w -> n (h two) w")
    return full[:, : size[0], : size[1]]


def _check_up_size(size: object, h: int, w: int) -> tuple[int, int]:
    if size is None:
        return 2 * h, 2 * w
    if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(s, int) for s in size):
        raise TypeError(f"size must be a pair of ints (H, W), got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    for name, n, target in (("height", h, out_h), ("width", w, out_w)):
        if target not in (2 * n - 1, 2 * n) or target < 1:
            raise ValueError(
                f"size {tuple(size)} is not reachable from a {h}x{w} input: the output {name} must be "
                f"{2 * n - 1} or {2 * n} (twice the input, or one less for odd targets)"
            )
    return out_h, out_w


def _flatten(x: Tensor) -> Tensor:
    return rearrange(x, "... h w -> (...) h w")


def _unflatten(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(*like.shape[:-2], *x.shape[-2:]).to(like.dtype)


def pyr_down(x: Tensor, *, check_finite: bool = True) -> Tensor:
    """Blur with the 5-tap binomial kernel and halve each side (OpenCV ``pyrDown``).

    Args:
        x: (..., H, W) floating image.
        check_finite: reject NaN/inf inputs (see the module notes).

    Returns:
        (..., ceil(H/2), ceil(W/2)) tensor of ``x``'s dtype.

    Example:
        >>> pyr_down(torch.rand(2, 3, 7, 10)).shape
        torch.Size([2, 3, 4, 5])
    """
    check_image(x, "x", check_finite=check_finite)
    return _unflatten(_down(_flatten(_work_dtype(x))), x)


def pyr_up(x: Tensor, size: tuple[int, int] | None = None, *, check_finite: bool = True) -> Tensor:
    """Upsample onto the doubled grid and blur with 4x the binomial kernel (OpenCV ``pyrUp``).

    Args:
        x: (..., h, w) floating image.
        size: output (H, W) with H in {2h - 1, 2h} and W in {2w - 1, 2w}; default (2h, 2w).
        check_finite: reject NaN/inf inputs (see the module notes).

    Returns:
        (..., H, W) tensor of ``x``'s dtype.

    Example:
        >>> pyr_up(torch.rand(3, 4, 5), size=(7, 10)).shape
        torch.Size([3, 7, 10])
    """
    check_image(x, "x", check_finite=check_finite)
    out_size = _check_up_size(size, *x.shape[-2:])
    return _unflatten(_up(_flatten(_work_dtype(x)), out_size), x)


def gaussian_pyramid(x: Tensor, levels: int, *, check_finite: bool = True) -> list[Tensor]:
    """Gaussian pyramid: ``x`` followed by ``levels - 1`` successive ``pyr_down`` images.

    Args:
        x: (..., H, W) floating image.
        levels: number of levels including ``x`` itself, 1 <= levels <= ``max_levels(H, W)``.

    Returns:
        ``levels`` tensors; level i has shape (..., H_i, W_i) with H_0 = H and H_{i+1} = ceil(H_i / 2).

    Example:
        >>> [tuple(g.shape) for g in gaussian_pyramid(torch.rand(1, 3, 9, 8), 3)]
        [(1, 3, 9, 8), (1, 3, 5, 4), (1, 3, 3, 2)]
    """
    check_image(x, "x", check_finite=check_finite)
    check_levels(levels, *x.shape[-2:])
    current = _flatten(_work_dtype(x))
    out = [x]
    for _ in range(levels - 1):
        current = _down(current)
        out.append(_unflatten(current, x))
    return out


def _laplacian(x: Tensor, levels: int) -> list[Tensor]:
    """Laplacian levels of a validated (N, H, W) tensor, in its own dtype."""
    if levels > 1 and _native(x):
        return list(native_ops.laplacian(x, levels))
    return native_ops.laplacian_levels(x, levels, _down, _up)


def laplacian_pyramid(x: Tensor, levels: int, *, check_finite: bool = True) -> list[Tensor]:
    """Laplacian pyramid: ``levels - 1`` band-pass images, then the low-pass residual.

    Band i is ``G_i - pyr_up(G_{i+1}, size(G_i))`` for the Gaussian levels G; the last entry is
    G_{levels-1} itself, so that ``reconstruct_laplacian`` inverts the decomposition exactly.

    Args:
        x: (..., H, W) floating image.
        levels: total number of returned tensors, 1 <= levels <= ``max_levels(H, W)``.

    Returns:
        ``levels`` tensors with the Gaussian pyramid's shapes: (..., H_i, W_i).

    Example:
        >>> pyr = laplacian_pyramid(torch.rand(2, 3, 32, 32), 4)
        >>> [p.shape[-1] for p in pyr]
        [32, 16, 8, 4]
    """
    check_image(x, "x", check_finite=check_finite)
    check_levels(levels, *x.shape[-2:])
    return [_unflatten(level, x) for level in _laplacian(_flatten(_work_dtype(x)), levels)]


def _check_pyramid(pyramid: object) -> list[Tensor]:
    if isinstance(pyramid, Tensor) or not isinstance(pyramid, Sequence) or len(pyramid) == 0:
        raise TypeError(
            f"pyramid must be a non-empty list of (..., H_i, W_i) tensors as laplacian_pyramid returns, "
            f"got {type(pyramid).__name__}"
        )
    levels = list(pyramid)
    for i, level in enumerate(levels):
        check_image(level, f"pyramid[{i}]", check_finite=False)
    lead = levels[0].shape[:-2]
    for i, level in enumerate(levels):
        if level.device != levels[0].device:
            raise ValueError(f"pyramid[{i}] is on {level.device}, expected {levels[0].device} (that of pyramid[0])")
    for i in range(1, len(levels)):
        finer, coarser = levels[i - 1].shape, levels[i].shape
        expected = ((finer[-2] + 1) // 2, (finer[-1] + 1) // 2)
        if coarser[:-2] != lead or tuple(coarser[-2:]) != expected:
            raise ValueError(
                f"pyramid[{i}] has shape {tuple(coarser)}, expected {(*lead, *expected)} "
                f"(half of pyramid[{i - 1}] {tuple(finer)}, rounded up)"
            )
    return levels


def reconstruct_laplacian(pyramid: Sequence[Tensor]) -> Tensor:
    """Invert ``laplacian_pyramid``: collapse from the residual up, adding each band.

    Args:
        pyramid: the list ``laplacian_pyramid`` returns, finest band first, residual last.

    Returns:
        (..., H, W) image of the finest level's dtype.

    Example:
        >>> x = torch.rand(1, 3, 17, 23, dtype=torch.float64)
        >>> bool((reconstruct_laplacian(laplacian_pyramid(x, 4)) - x).abs().max() < 1e-12)
        True
    """
    levels = _check_pyramid(pyramid)
    current = _flatten(_work_dtype(levels[-1]))
    for band in reversed(levels[:-1]):
        current = _up(current, tuple(band.shape[-2:]), _flatten(_work_dtype(band)), 1.0 / 64.0)
    return _unflatten(current, levels[0])


class GaussianPyramid(nn.Module):
    """Module form of :func:`gaussian_pyramid`: (..., H, W) -> ``levels`` tensors (..., H_i, W_i)."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        check_level_count(levels)
        self.levels = levels

    def forward(self, x: Tensor) -> list[Tensor]:
        return gaussian_pyramid(x, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class LaplacianPyramid(nn.Module):
    """Module form of :func:`laplacian_pyramid` with its inverse as :meth:`reconstruct`.

    Example:
        >>> lap = LaplacianPyramid(levels=3)
        >>> x = torch.rand(2, 3, 64, 64)
        >>> bool((lap.reconstruct(lap(x)) - x).abs().max() < 1e-5)
        True
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        check_level_count(levels)
        self.levels = levels

    def forward(self, x: Tensor) -> list[Tensor]:
        return laplacian_pyramid(x, self.levels)

    def reconstruct(self, pyramid: Sequence[Tensor]) -> Tensor:
        return reconstruct_laplacian(pyramid)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
