"""Baselines: every token, a uniform random subset, and uniform downsampling to a coarser grid.

Recent token-reduction studies find random selection and plain downsampling hard to beat, so they are
first-class policies here, not afterthoughts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.select import spread_priority
from pyrtok.tokens import MultiScaleTokens


@register("all")
class AllTokens(Allocator):
    """Every token. With a budget below N, the first ``budget`` tokens of the canonical order (coarse first)."""

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        order = torch.arange(tokens.num_tokens, 0, -1, device=tokens.device, dtype=torch.float32)
        return order.expand(tokens.batch_size, -1)


@register("random")
class RandomTokens(Allocator):
    """A uniform random subset of all levels.

    Args:
        seed: seed used when no ``generator`` is passed, so that a run is reproducible by default.
    """

    def __init__(self, seed: int = 0, **options) -> None:
        super().__init__(**options)
        self.seed = int(seed)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        generator = ctx.generator or torch.Generator().manual_seed(self.seed)
        noise = torch.rand(tokens.features.shape[:2], generator=generator, device=generator.device)
        return noise.to(tokens.device)


@register("pool")
class PoolTokens(Allocator):
    """Uniform downsampling: the finest whole level that fits the budget, topped up evenly from the next finer.

    With budget K, the level l with the most tokens n_l <= K is kept entirely (it is the 2^l-pooled grid);
    the remaining K - n_l tokens are spread evenly over level l - 1 as a uniform subgrid. If even the
    coarsest level exceeds K, K tokens are spread evenly over it.
    """

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        sizes = tokens.level_sizes  # (L,)
        fits = sizes.unsqueeze(0) <= budgets.unsqueeze(1)  # (B, L)
        top = tokens.num_levels - 1
        # Finest fitting level per sample (levels are ordered finest first, so the first True).
        chosen = torch.where(fits.any(1), fits.float().argmax(1), torch.full_like(budgets, top))
        level = tokens.level.unsqueeze(0)
        whole = (level == chosen.unsqueeze(1)) & fits.gather(1, chosen.unsqueeze(1))
        top_up = level == (chosen.unsqueeze(1) - fits.gather(1, chosen.unsqueeze(1)).long())
        spread = spread_priority(tokens.level_shapes, tokens.device).unsqueeze(0)
        return 2.0 * whole + 1.0 * top_up + spread
