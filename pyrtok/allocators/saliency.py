"""Saliency-driven selection in the spirit of PyramidDrop: per-level weights, one global top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.signals.saliency import METHODS, saliency
from pyrtok.tokens import MultiScaleTokens


def level_weight_vector(weights: Sequence[float] | None, num_levels: int, step: float, device) -> Tensor:
    """(L,) weights; default 1 + step * l, so coarser tokens (each covering 4x the area) get a mild boost."""
    if weights is None:
        return 1.0 + step * torch.arange(num_levels, device=device, dtype=torch.float32)
    values = torch.as_tensor(list(weights), dtype=torch.float32, device=device)
    if values.numel() < num_levels:
        # Levels beyond the configured ones reuse the last weight.
        values = torch.cat([values, values[-1:].expand(num_levels - values.numel())])
    return values[:num_levels]


@register("saliency")
class SaliencyTokens(Allocator):
    """Global top-k over ``level_weights[level] * saliency``.

    Args:
        level_weights: weight per level (finest first); default 1 + 0.25 l.
        method: saliency map: "spectral_residual", "center_surround" or "combined".
    """

    needs = ("image",)

    def __init__(self, level_weights: Sequence[float] | None = None, method: str = "combined", **options) -> None:
        super().__init__(**options)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if level_weights is not None and (len(level_weights) == 0 or min(level_weights) < 0):
            raise ValueError(f"level_weights must be a non-empty list of non-negative numbers, got {level_weights!r}")
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]
        self.method = method

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        weights = level_weight_vector(self.level_weights, tokens.num_levels, 0.25, tokens.device)
        scores = saliency(tokens, ctx.image, self.method, check_finite=ctx.unchecked("image"))
        return scores * weights[tokens.level].unsqueeze(0)
