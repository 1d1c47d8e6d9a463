"""Band-energy allocation: the budget is split across levels by Laplacian band energy, then top energy per level."""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.select import water_fill
from pyrtok.tokens import MultiScaleTokens


@register("laplacian")
class LaplacianTokens(Allocator):
    """Quota of level l proportional to the band energy of level l (water-filled so no level overflows).

    A level's energy is the sum over its tokens of mean band energy times box area, i.e. the band's total
    energy. Within a level the highest-energy tokens are kept.

    Args:
        power: exponent on the level energies before splitting (0 = split by level size, 1 = by energy).
    """

    needs = ("image",)

    def __init__(self, power: float = 1.0, **options) -> None:
        super().__init__(**options)
        if not 0.0 <= float(power):
            raise ValueError(f"power must be >= 0, got {power!r}")
        self.power = float(power)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        return ctx.band_energy(tokens)

    def quotas(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context, priority: Tensor) -> Tensor:
        box = tokens.box
        area = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).unsqueeze(0)
        level_energy = torch.stack([(priority * area)[:, s].sum(1) for s in tokens.level_slices], 1)
        sizes = tokens.level_sizes.unsqueeze(0).to(level_energy.dtype)
        # size * (energy per token)^power: power 1 splits by energy, power 0 by level size.
        weights = sizes * (level_energy / sizes).clamp_min(0).pow(self.power)
        return water_fill(weights, tokens.level_sizes, budgets)
