"""Difficulty-aware allocation in the spirit of FastVLM-style dynamic resolution.

A calibrated difficulty d in [0, 1] per image picks three things:

- the budget tier: ``tiers[min(floor(d * T), T - 1)]`` of the given budget (easy images use less);
- the pyramid depth: the ``1 + round(d * (L - 1))`` coarsest levels are usable (easy images stay coarse),
  or more when they hold fewer tokens than the budget;
- the split across the usable levels: weight n_l^d (d = 0: even split; d = 1: proportional to level
  size, so fine levels get most), water-filled to the level sizes.

Within each level, tokens are ranked by Laplacian band energy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.select import water_fill
from pyrtok.signals.difficulty import difficulty
from pyrtok.tokens import MultiScaleTokens


@register("difficulty")
class DifficultyTokens(Allocator):
    """Per-image budget tier, depth and level split from calibrated difficulty (see module notes).

    Args:
        tiers: increasing fractions of the budget, one per difficulty band; the last must be 1.0.
    """

    needs = ("image",)

    def __init__(self, tiers: Sequence[float] = (0.25, 0.5, 0.75, 1.0), **options) -> None:
        super().__init__(**options)
        tiers = [float(t) for t in tiers]
        if not tiers or any(not 0 < t <= 1 for t in tiers) or tiers != sorted(tiers) or tiers[-1] != 1.0:
            raise ValueError(f"tiers must be increasing fractions in (0, 1] ending with 1.0, got {tiers!r}")
        self.tiers = tiers

    def reads(self, ctx: Context) -> tuple[str, ...]:
        # With a query, difficulty also measures how widely it spreads over the tokens.
        return ("image", "query", "features") if ctx.query is not None else ("image",)

    def _difficulty(self, tokens: MultiScaleTokens, ctx: Context) -> Tensor:
        return ctx.cached(
            "difficulty",
            lambda: difficulty(ctx.image, tokens if ctx.query is not None else None, ctx.query,
                               band_maps=ctx.band_maps(tokens), check_finite=ctx.unchecked("image")),
        )

    def effective_budgets(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        d = self._difficulty(tokens, ctx)
        tiers = torch.tensor(self.tiers, device=tokens.device)
        tier = tiers[(d * len(self.tiers)).floor().long().clamp(0, len(self.tiers) - 1)]
        return (tier * budgets).round().long().clamp(1).minimum(budgets)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        return ctx.band_energy(tokens)

    def quotas(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context, priority: Tensor) -> Tensor:
        d = self._difficulty(tokens, ctx).unsqueeze(1)  # (B, 1)
        levels = tokens.num_levels
        depth = 1 + (d * (levels - 1)).round().long()  # usable coarsest levels
        # Go deeper only as far as the budget needs: tokens held by the k coarsest levels, k = 1..L.
        held = tokens.level_sizes.flip(0).cumsum(0).unsqueeze(0)  # (1, L)
        needed = 1 + (held < budgets.unsqueeze(1)).sum(1, keepdim=True)
        depth = torch.maximum(depth, needed)
        level_index = torch.arange(levels, device=tokens.device).unsqueeze(0)
        usable = level_index >= levels - depth
        sizes = tokens.level_sizes.unsqueeze(0).float()
        capacity = torch.where(usable, sizes, torch.zeros_like(sizes)).long()
        return water_fill(sizes.pow(d) * usable, capacity, budgets)
