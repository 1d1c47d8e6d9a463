"""The Laplacian pyramids of the LapLoss snippets people copy today, as presets of :class:`pyrtok.losses.LapLoss`.

Each preset reproduces one snippet's pyramid, level count and reduction exactly, so that swapping the copied code
for ``LapLoss.from_preset(name)`` keeps the same loss and gradients:

- ``"rife"`` (the RIFE frame-interpolation ``LapLoss``, ``model/laplacian.py``; CogVideo's demo carries the same
  code): the 5 x 5 binomial kernel / 256 with reflect padding; a band is the image minus the up-sampled (zero
  insertion, blurred with 4x the kernel) down-sampled (every second pixel of the blurred image) image; 5 bands,
  no low-pass residual; the sum over bands of the L1 mean. Its up-sampling doubles the down-sampled side, so it
  needs sides divisible by 2^5 = 32: the preset raises otherwise, or with ``any_size=True`` crops each
  up-sampled band to the image (a defined extension: the same loss wherever the snippet runs).
- ``"mtyka"`` (mtyka/laploss, TensorFlow): a 5 x 5 kernel, the normalised sum g(i) + g(j) of Gaussians
  exp(-(x - 2)^2 / sigma^2) with sigma 2; a band is the image minus its blur (zero padding, TensorFlow's
  ``SAME``), the next level the 2 x 2 average pool of the blur; 3 bands and the residual; per level the L1 sum
  over the element count, summed over levels, times the batch size (the per-sample losses summed).
- ``"glo"`` (the PyTorch port in tneumann/minimal_glo, ``glo.py``): mtyka's kernel and structure with
  replicate padding, 5 bands and the residual, the sum over levels of the L1 mean.

On top of a preset, ``residual=True`` adds the low-pass residual to RIFE (a constant shift then costs), and a
``mask`` weights each level's mean as in :func:`pyrtok.losses.lap_loss` (the mask carried down by the preset's
own kernel and down-sampling, padded by replication so that a mask of ones changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["PRESETS", "SnippetPyramid", "mask_pyramid", "preset", "snippet_pyramid"]

STRUCTURES = ("burt_adelson", "blur_difference")
PADDINGS = ("reflect", "replicate", "constant")


@dataclass(frozen=True)
class SnippetPyramid:
    """How a snippet builds its pyramid and reduces it.

    Attributes:
        kernel: ``"binomial"`` (RIFE: [1, 4, 6, 4, 1] squared / 256) or ``"gauss_sum"`` (mtyka, GLO).
        sigma: the Gaussian's sigma for ``"gauss_sum"``.
        padding: ``"reflect"``, ``"replicate"`` or ``"constant"`` (zeros).
        structure: ``"burt_adelson"`` (band = x - up(down(blur x)), next = down(blur x)) or ``"blur_difference"``
            (band = x - blur x, next = 2 x 2 average pool of blur x).
        bands: band levels (the snippet's ``max_levels``).
        residual: the low-pass residual is a level too.
        batch_sum: the per-sample losses are summed over the batch (mtyka); else averaged.
        any_size: ``burt_adelson`` on sides not divisible by 2^bands: crop up-sampled levels (else raise).
    """

    kernel: str
    sigma: float
    padding: str
    structure: str
    bands: int
    residual: bool
    batch_sum: bool = False
    any_size: bool = False

    @property
    def levels(self) -> int:
        """Levels the loss sums: the bands, and the residual where counted."""
        return self.bands + int(self.residual)


PRESETS: dict[str, SnippetPyramid] = {
    "rife": SnippetPyramid("binomial", 0.0, "reflect", "burt_adelson", 5, residual=False),
    "mtyka": SnippetPyramid("gauss_sum", 2.0, "constant", "blur_difference", 3, residual=True, batch_sum=True),
    "glo": SnippetPyramid("gauss_sum", 2.0, "replicate", "blur_difference", 5, residual=True),
}
"""The snippets' pyramids by name (see the module notes)."""


def preset(name: str, **changes: object) -> SnippetPyramid:
    """The preset ``name`` with ``changes`` (``residual``, ``any_size``, ``bands``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    unknown = set(changes) - {"residual", "any_size", "bands"}
    if unknown:
        raise ValueError(f"a preset takes residual, any_size and bands; got {sorted(unknown)}")
    return replace(PRESETS[name], **changes)


def _kernel(spec: SnippetPyramid, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(5, 5) the snippet's blur kernel, computed as the snippet computes it (float32 for the Gaussian sum)."""
    if spec.kernel == "binomial":
        row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
        return (torch.outer(row, row) / 256.0).to(dtype=dtype, device=device)
    grid = torch.arange(5, dtype=torch.float32)
    g = torch.exp((grid - 2) ** 2 / (-2 * spec.sigma**2)) ** 2
    kernel = g[:, None] + g[None, :]
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _blur(x: Tensor, kernel: Tensor, padding: str) -> Tensor:
    """(N, C, H, W) -> the same, each channel convolved with the (5, 5) ``kernel`` after 2-pixel ``padding``."""
    padded = F.pad(x, (2, 2, 2, 2), mode=padding)
    channels = x.shape[1]
    return F.conv2d(padded, kernel[None, None].expand(channels, 1, 5, 5), groups=channels)


def _upsample(x: Tensor, kernel: Tensor, padding: str, size: tuple[int, int]) -> Tensor:
    """RIFE's up-sampling: zeros between samples, blurred with 4x the kernel, cropped to ``size``."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, 4 * kernel, padding)[:, :, : size[0], : size[1]]


def _as_channels(x: Tensor) -> Tensor:
    """(B, ..., C, H, W) -> (N, C, H, W) (a plane (B, H, W) -> (B, 1, H, W)), the layout the snippets convolve."""
    return rearrange(x, "... c h w -> (...) c h w") if x.dim() >= 4 else rearrange(x, "... h w -> (...) 1 h w")


def _check_size(spec: SnippetPyramid, height: int, width: int) -> None:
    if spec.structure == "burt_adelson" and not spec.any_size:
        step = 2**spec.bands
        if height % step or width % step:
            raise ValueError(f"the RIFE pyramid needs sides divisible by 2**bands = {step} (its up-sampling doubles "
                             f"the down-sampled side), got {height}x{width}; pass any_size=True to crop instead")
    smallest = 2 ** (spec.bands - 1) * (3 if spec.padding == "reflect" else 1)
    if min(height, width) < smallest:
        why = ", so that reflect padding fits the last band" if spec.padding == "reflect" else ""
        raise ValueError(f"{spec.bands} bands need sides >= {smallest}{why}, got {height}x{width}")


def snippet_pyramid(x: Tensor, spec: SnippetPyramid) -> list[Tensor]:
    """The snippet's pyramid of ``x`` (B, ..., H, W): ``spec.levels`` tensors (B, ..., H_j, W_j), finest first.

    Example:
        >>> levels = snippet_pyramid(torch.rand(2, 3, 64, 64), PRESETS["rife"])
        >>> [tuple(level.shape[-2:]) for level in levels]
        [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    """
    if spec.structure not in STRUCTURES or spec.padding not in PADDINGS:
        raise ValueError(f"structure must be one of {STRUCTURES} and padding one of {PADDINGS}")
    lead = x.shape[:-2]
    height, width = x.shape[-2:]
    _check_size(spec, height, width)
    kernel = _kernel(spec, x.dtype, x.device)
    current = _as_channels(x)
    levels = []
    for _ in range(spec.bands):
        blurred = _blur(current, kernel, spec.padding)
        if spec.structure == "burt_adelson":
            down = blurred[:, :, ::2, ::2]
            levels.append(current - _upsample(down, kernel, spec.padding, tuple(current.shape[-2:])))
        else:
            levels.append(current - blurred)
            down = F.avg_pool2d(blurred, 2)
        current = down
    if spec.residual:
        levels.append(current)
    return [level.reshape(*lead, *level.shape[-2:]) for level in levels]


def mask_pyramid(mask: Tensor, spec: SnippetPyramid) -> list[Tensor]:
    """``mask`` (B, ..., H, W) at each level's size, carried down by the snippet's own kernel and down-sampling,
    padded by replication whatever the snippet pads images with (so that a mask of ones stays ones)."""
    lead = mask.shape[:-2]
    kernel = _kernel(spec, mask.dtype, mask.device)
    current = _as_channels(mask)
    levels = [current]
    for _ in range(spec.levels - 1):
        blurred = _blur(current, kernel, "replicate")
        current = blurred[:, :, ::2, ::2] if spec.structure == "burt_adelson" else F.avg_pool2d(blurred, 2)
        levels.append(current)
    return [level.reshape(*lead, *level.shape[-2:]) for level in levels]
