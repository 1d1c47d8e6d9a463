"""LapLoss: a Laplacian-pyramid reconstruction loss.

``pred`` and ``target`` are compared band by band in their Laplacian pyramids, low-pass residual
included (without the residual, a prediction that is off by a constant or a smooth gradient costs
nothing). Because the pyramid is linear, the bands of ``pred - target`` are the differences of the bands,
so a single pyramid of the difference is built.

Level weights. Level j (j = 0 finest band, j = levels - 1 the residual) contributes
``weights[j] * mean_j(distance(band_j))``. The mean is over that level's own elements, so a level with 4x
fewer pixels is not 4x quieter: with the default weights of 1, an error of a given per-pixel amplitude
costs the same in every octave. That equals a plain sum over coefficients weighted by 4^j, which
compensates for the 4x fewer coefficients per octave down the pyramid. Pass decreasing weights (for example
2^-j) to stress fine detail, or increasing ones to stress layout and colour.

Masks. ``mask`` (B, 1, H, W) (or (B, T, 1, H, W) for video; anything that broadcasts to ``pred`` with the
same batch and spatial size) holds per-pixel weights in [0, 1]. It is carried down the pyramid with the
same Burt-Adelson ``pyr_down`` as the images, so level j sees a blurred, downsampled mask, and each level's
distance becomes a mask-weighted mean. Pixels with weight 0 at level 0 (and coarse coefficients whose
support lies outside the mask) cost nothing, which is what MAE-style pretraining needs: loss on the masked
patches only. A sample whose mask is all zero contributes 0.

Non-finite values. A NaN or infinity in ``target`` raises (it is a data problem); one in ``pred`` flows
into the loss, as with ``torch.nn.functional.mse_loss``, so that AMP gradient scalers and divergence
checks see it.

float16 and bfloat16 inputs are computed in float32; the loss is returned in float32 for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from pyrtok._checks import check_image, check_level_count, check_levels, max_levels
from pyrtok.lap_presets import SnippetPyramid, mask_pyramid, preset, snippet_pyramid
from pyrtok.pyramid import gaussian_pyramid, laplacian_pyramid

__all__ = ["DISTANCES", "LapLoss", "lap_loss", "laplacian_band_errors"]

DISTANCES = ("l1", "l2", "charbonnier")
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_MAX_LEVELS = 5


def _distance(diff: Tensor, distance: str, eps: float) -> Tensor:
    if distance == "l1":
        return diff.abs()
    if distance == "l2":
        return diff.square()
    # Shifted by eps so that identical inputs give exactly zero.
    return torch.sqrt(diff.square() + eps * eps) - eps


class _MeanAbs(torch.autograd.Function):
    """(B, N) -> (B,): the mean |x| of each row, as an L1 norm (no (B, N) temporary forward). Its gradient,
    sign(x) times the row's scale, is written once and scaled in place: the norm's own backward allocates a
    second full-size tensor for the product."""

    @staticmethod
    def forward(flat: Tensor) -> Tensor:
        return torch.linalg.vector_norm(flat, ord=1, dim=-1) / flat.shape[-1]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        return flat.sign().mul_((grad / flat.shape[-1]).unsqueeze(-1))


def _mean_distance(flat: Tensor, distance: str, eps: float) -> Tensor:
    """(B, N) float32 or float64 rows (the caller casts lower precisions) -> (B,): the mean distance of each row.

    L1 (``_MeanAbs``) and L2 (a dot product) take the gradient straight from the (B,) one, where ``mean``
    backward first writes a full-size copy of it."""
    n = flat.shape[-1]
    if distance == "l1":
        return _MeanAbs.apply(flat)
    if distance == "l2":
        return torch.linalg.vecdot(flat, flat) / n
    return _distance(flat, distance, eps).mean(-1)


def _check_pair(pred: object, target: object) -> tuple[Tensor, Tensor]:
    check_image(pred, "pred", check_finite=False)
    check_image(target, "target", check_finite=True)
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    if pred.dim() < 3:
        raise ValueError(
            f"pred must be batched: (B, C, H, W) images or (B, T, C, H, W) video, got shape {tuple(pred.shape)}"
        )
    return pred, target


def _check_mask(mask: object, pred: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (B, 1, H, W) or None, got {type(mask).__name__}")
    expected = f"a tensor with {pred.dim()} dims that broadcasts to pred {tuple(pred.shape)}, e.g. (B, 1, H, W)"
    if mask.dim() != pred.dim() or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {expected}")
    try:
        torch.broadcast_shapes(mask.shape, pred.shape)
    except RuntimeError:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {expected}") from None
    if mask.dtype == torch.bool:
        mask = mask.float()
    elif not mask.is_floating_point():
        raise TypeError(f"mask must be bool or floating with values in [0, 1], got {mask.dtype}")
    if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask values must lie in [0, 1] (they are per-pixel loss weights)")
    return mask.to(device=pred.device, dtype=torch.float32 if pred.dtype != torch.float64 else torch.float64)


def _resolve_levels(levels: int | None, height: int, width: int) -> int:
    if levels is None:
        return min(DEFAULT_MAX_LEVELS, max_levels(height, width))
    return check_levels(levels, height, width)


def laplacian_band_errors(
    pred: Tensor,
    target: Tensor,
    levels: int | None = None,
    *,
    distance: str = "l1",
    mask: Tensor | None = None,
    eps: float = 1e-3,
    snippet: SnippetPyramid | None = None,
) -> Tensor:
    """Per-sample, per-level distance between the Laplacian pyramids of ``pred`` and ``target``.

    Args:
        pred: (B, ..., H, W) prediction, e.g. (B, C, H, W) or video (B, T, C, H, W).
        target: same shape and dtype as ``pred``.
        levels: pyramid levels (bands + residual); default ``min(5, max_levels(H, W))``.
        distance: ``"l1"``, ``"l2"`` (squared error) or ``"charbonnier"`` (sqrt(d^2 + eps^2) - eps).
        mask: optional per-pixel weights in [0, 1] broadcastable to ``pred``, e.g. (B, 1, H, W).
        eps: Charbonnier smoothing.
        snippet: build the pyramid as a copied snippet does instead (:mod:`pyrtok.lap_presets`); ``levels`` is
            then the snippet's.

    Returns:
        (B, levels) float tensor: column j is the (mask-weighted) mean distance of band j, the last
        column the low-pass residual (where the pyramid has one).

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> laplacian_band_errors(x, x.flip(-1), levels=3).shape
        torch.Size([2, 3])
    """
    _check_pair(pred, target)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    height, width = pred.shape[-2:]
    n_levels = snippet.levels if snippet is not None else _resolve_levels(levels, height, width)
    weight_mask = None if mask is None else _check_mask(mask, pred)

    work = torch.float64 if pred.dtype == torch.float64 else torch.float32
    diff = (pred.to(work) - target.to(work))
    batch = diff.shape[0]
    # pred may hold NaN on purpose (see the module notes) and the mask is already checked: skip the finite checks.
    if snippet is not None:
        bands = snippet_pyramid(diff, snippet)
        mask_levels = None if weight_mask is None else mask_pyramid(weight_mask.to(work), snippet)
    else:
        bands = laplacian_pyramid(diff, n_levels, check_finite=False)
        if weight_mask is not None:
            mask_levels = gaussian_pyramid(weight_mask, n_levels, check_finite=False)

    errors = []
    for j, band in enumerate(bands):
        if weight_mask is None:
            errors.append(_mean_distance(rearrange(band, "b ... -> b (...)"), distance, eps))
            continue
        dist = _distance(band, distance, eps)
        m = mask_levels[j].expand_as(dist)
        total = rearrange(dist * m, "b ... -> b (...)").sum(-1)
        weight = rearrange(m, "b ... -> b (...)").sum(-1)
        errors.append(total / weight.clamp_min(torch.finfo(work).tiny))
    return torch.stack(errors, dim=-1).reshape(batch, n_levels)


def _check_weights(weights: Sequence[float] | Tensor | None, n_levels: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.ones(n_levels, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() != 1 or w.numel() != n_levels:
        raise ValueError(f"weights must have one entry per level ({n_levels}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    return w


def lap_loss(
    pred: Tensor,
    target: Tensor,
    levels: int | None = None,
    weights: Sequence[float] | Tensor | None = None,
    distance: str = "l1",
    mask: Tensor | None = None,
    reduction: str = "mean",
    *,
    eps: float = 1e-3,
    snippet: SnippetPyramid | None = None,
) -> Tensor:
    """Laplacian-pyramid loss: weighted sum over levels of per-level mean distances.

    Args:
        pred: (B, ..., H, W) prediction, e.g. (B, C, H, W) or video (B, T, C, H, W).
        target: same shape and dtype as ``pred``.
        levels: pyramid levels (bands + residual); default ``min(5, max_levels(H, W))``.
        weights: ``levels`` non-negative weights, finest band first, residual last; default all 1
            (see the module notes for how they relate to band scale).
        distance: ``"l1"``, ``"l2"`` (squared error) or ``"charbonnier"``.
        mask: optional (B, 1, H, W) per-pixel weights in [0, 1] (1 = counted), carried down the pyramid.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for a (B,) tensor.
        eps: Charbonnier smoothing.
        snippet: a copied snippet's pyramid (:mod:`pyrtok.lap_presets`; :meth:`LapLoss.from_preset` sets it).

    Returns:
        Scalar loss, or (B,) with ``reduction="none"``; float32 for half-precision inputs.

    Example:
        >>> x = torch.rand(2, 3, 64, 64)
        >>> float(lap_loss(x, x))
        0.0
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    errors = laplacian_band_errors(pred, target, levels, distance=distance, mask=mask, eps=eps, snippet=snippet)
    per_sample = errors @ _check_weights(weights, errors.shape[-1], errors)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class LapLoss(nn.Module):
    """Module form of :func:`lap_loss`; ``forward(pred, target, mask=None)``.

    Example:
        >>> loss = LapLoss(levels=4, distance="charbonnier")
        >>> pred = torch.rand(2, 3, 64, 64, requires_grad=True)
        >>> loss(pred, torch.rand(2, 3, 64, 64)).backward()
    """

    def __init__(
        self,
        levels: int | None = None,
        weights: Sequence[float] | None = None,
        distance: str = "l1",
        reduction: str = "mean",
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_level_count(levels, optional=True)
        if weights is not None and levels is not None and len(weights) != levels:
            raise ValueError(f"weights must have one entry per level ({levels}), got {len(weights)}")
        self.levels, self.distance, self.reduction, self.eps = levels, distance, reduction, eps
        self.weights = None if weights is None else [float(w) for w in weights]
        self.preset: str | None = None  # a snippet's name (from_preset), and its pyramid
        self.snippet: SnippetPyramid | None = None

    @classmethod
    def from_preset(cls, name: str, *, residual: bool | None = None, any_size: bool = False,
                    distance: str = "l1") -> LapLoss:
        """The loss a copied snippet computes (``"rife"``, ``"mtyka"``, ``"glo"``: :mod:`pyrtok.lap_presets`):
        the same value and gradients; ``residual`` adds (or drops) the low-pass residual, ``any_size`` lets the
        RIFE pyramid run on sides it cannot (see the module), ``forward``'s ``mask`` weights every level.

        Example:
            >>> image, shifted = torch.zeros(1, 3, 64, 64), torch.full((1, 3, 64, 64), 0.5)
            >>> float(LapLoss.from_preset("rife")(image, shifted))  # the snippet is blind to a constant shift
            0.0
            >>> float(LapLoss.from_preset("rife", residual=True)(image, shifted))
            0.5
        """
        changes: dict[str, object] = {"any_size": any_size}
        if residual is not None:
            changes["residual"] = residual
        snippet = preset(name, **changes)
        loss = cls(distance=distance, reduction="sum" if snippet.batch_sum else "mean")
        loss.preset, loss.snippet = name, snippet
        return loss

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return lap_loss(
            pred, target, self.levels, self.weights, self.distance, mask, self.reduction, eps=self.eps,
            snippet=self.snippet,
        )

    def extra_repr(self) -> str:
        text = f"levels={self.levels}, weights={self.weights}, distance={self.distance!r}, reduction={self.reduction!r}"
        return text if self.preset is None else f"preset={self.preset!r}, {text}"
