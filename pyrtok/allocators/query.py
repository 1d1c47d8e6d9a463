"""Query-aware selection: top-k by relevance to the text, above a floor of coarse context tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.select import spread_priority
from pyrtok.signals.query import query_relevance
from pyrtok.tokens import MultiScaleTokens


@register("query")
class QueryTokens(Allocator):
    """Keep ceil(context * K) evenly spread tokens of the coarsest level, then the most query-relevant tokens.

    Args:
        context: fraction of the budget reserved for coarse context (capped by the coarsest level's size).
    """

    needs = ("query",)

    def __init__(self, context: float = 0.125, **options) -> None:
        super().__init__(**options)
        if not 0.0 <= float(context) <= 1.0:
            raise ValueError(f"context must be a fraction in [0, 1], got {context!r}")
        self.context = float(context)

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("query", "features")

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        relevance = query_relevance(tokens, ctx.query)  # float32, [-1, 1]
        top = tokens.num_levels - 1
        n_top = tokens.level_shapes[top][0] * tokens.level_shapes[top][1]
        floor = (budgets.float() * self.context).ceil().long().clamp(max=n_top)  # (B,)
        spread = spread_priority(tokens.level_shapes, tokens.device)
        in_top = tokens.level == top
        # Rank of each coarsest-level token in the even-spread order.
        top_order = torch.argsort(spread[in_top], descending=True, stable=True)
        rank = torch.full_like(tokens.level, tokens.num_tokens)
        rank[torch.nonzero(in_top).flatten()[top_order]] = torch.arange(n_top, device=tokens.device)
        context = rank.unsqueeze(0) < floor.unsqueeze(1)
        # Exact ties in relevance (flat regions) go to the evenly spread token; 1e-6 is below any real gap.
        return relevance + 4.0 * context + 1e-6 * spread
