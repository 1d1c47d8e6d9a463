"""Energy-weighted diversity over the whole pyramid, with the dropped tokens merged into the kept ones.

pyrtok's own allocator for small budgets. DivPrune keeps a maximally diverse set of one grid's tokens; here
every level of the pyramid is a candidate, and a token's claim to be kept is its distance to what is already
kept times how much detail its level's Laplacian band holds there:

- weight: each token's band energy (:meth:`~pyrtok.allocators.base.Context.band_energy`) over the largest of
  its level in that image, floored at 1e-6, to the power ``alpha``. Within a level the busiest token has weight
  1; a coarse token of a busy region counts as much as a fine token of a busy one.
- greedy (:func:`~pyrtok.allocators.divprune.max_min_order` with ``weight``): first the token with the largest
  weight x cosine distance to its nearest neighbour, then repeatedly the token with the largest weight x
  distance to the kept set, in the language model's input embeddings (``tokens.embeddings``, else the
  features), in their own dtype. ``alpha=0`` is DivPrune over every level (``divprune`` with ``scales="all"``)
  pick for pick.
- merge (``merge=True``, default): every dropped token joins its most cosine-similar kept token, and a kept
  token becomes the mean of itself and what joined it (VScan's merge, here over every level), so the budget's
  tokens carry what the others held. In a float32 space the merge reads the kept tokens' columns of the cosine
  matrix the picks were made on (one matrix product per call, not two); other dtypes merge in float32.

How it was chosen: on the tiny LLaVA's validation split (1,000 questions; no test question was looked at), out
of level-split, rank-normalised, globally normalised, tower-space and position-aware forms; ``alpha`` 1
against 0.5 and 1.5. Its figures on the test and seed-1 splits are in ``eval/RESULTS.md``.

Example:
    >>> from pyrtok.tokens import from_feature_grid
    >>> tokens = from_feature_grid(torch.randn(2, 8, 8, 16), 3, image_size=(64, 64))
    >>> selection = EnergyDiversityTokens()(tokens, 10, image=torch.rand(2, 3, 64, 64))
    >>> selection.count.tolist(), tuple(selection.kept_embeddings.shape)
    ([10, 10], (2, 10, 16))
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.divprune import cosine_similarity, embedding_space, max_min_order
from pyrtok.allocators.registry import register
from pyrtok.allocators.vscan import merged_kept
from pyrtok.budget import resolve_budget
from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = ["EnergyDiversityTokens", "level_normalised_energy"]

FLOOR = 1e-6
"""The smallest weight: a token with no band energy can still be picked once nothing else is left."""


def level_normalised_energy(tokens: MultiScaleTokens, energy: Tensor) -> Tensor:
    """(B, N) band energy over the largest of the token's level in its image, floored at :data:`FLOOR`."""
    out = torch.empty_like(energy)
    for level in tokens.level_slices:
        part = energy[:, level]
        out[:, level] = part / part.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return out.clamp_min(FLOOR)


@register("energy_diversity")
class EnergyDiversityTokens(Allocator):
    """Max-min diversity over every level, weighted by level-normalised band energy; dropped tokens merged.

    Args:
        alpha: exponent of the energy weight (0: DivPrune over every level).
        merge: merge every dropped token into its most similar kept token (``kept_embeddings``).
    """

    needs = ("image",)

    def __init__(self, alpha: float = 1.0, merge: bool = True, **options) -> None:
        super().__init__(**options)
        if self.redundancy:
            raise ValueError("energy_diversity picks by diversity and merges what it drops: the redundancy pass does "
                             "not apply (redundancy must be False)")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= float(alpha):
            raise ValueError(f"alpha must be a number >= 0 (the exponent of the energy weight), got {alpha!r}")
        if not isinstance(merge, bool):
            raise TypeError(f"merge must be a bool, got {merge!r}")
        self.alpha, self.merge = float(alpha), merge

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("image", "features")

    def _order(self, tokens: MultiScaleTokens, budgets: Tensor,
               ctx: Context) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, steps) the greedy picks up to the largest budget, the (B, N, D') space they were made in, and the
        (B, N, N) cosine similarity they were made on when it is float32 (the merge reads its kept columns; other
        dtypes merge in float32 on their own)."""
        weight = level_normalised_energy(tokens, ctx.band_energy(tokens).float()).pow(self.alpha)
        weight = weight.clamp_min(torch.finfo(weight.dtype).tiny)  # a large alpha must not round a weight to 0
        space = embedding_space(tokens, self.name)
        steps = min(space.shape[1], int(budgets.max()))
        # distances in the embeddings' own dtype, as DivPrune computes them
        similarity = cosine_similarity(space)
        order = max_min_order(space, steps, weight=weight, similarity=similarity)
        return order, space, similarity if similarity.dtype == torch.float32 else None

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        order, _, _ = self._order(tokens, budgets, ctx)
        steps = order.shape[1]
        score = torch.full(tokens.features.shape[:2], -float(steps), device=tokens.device)
        return score.scatter_(1, order, -torch.arange(steps, device=tokens.device, dtype=torch.float32)
                              .expand_as(order))

    def __call__(self, tokens: MultiScaleTokens, budget: int | Tensor, *, image: Tensor | None = None,
                 query: Tensor | None = None, generator: torch.Generator | None = None) -> TokenSelection:
        if not self.merge:
            return super().__call__(tokens, budget, image=image, query=query, generator=generator)
        ctx = self._context(tokens, image, query, generator)
        budgets = self.effective_budgets(tokens, resolve_budget(budget, *tokens.features.shape[:2], tokens.device),
                                         ctx)
        # the first budget_b picks of sample b: what the top-k of :meth:`priority` keeps
        order, space, similarity = self._order(tokens, budgets, ctx)
        taken = torch.arange(order.shape[1], device=tokens.device) < budgets.unsqueeze(1)
        keep = torch.zeros(tokens.features.shape[:2], dtype=torch.bool, device=tokens.device).scatter_(1, order, taken)
        selection = TokenSelection.from_keep_mask(keep)
        kept = merged_kept(space, keep, ~keep, similarity=similarity)
        return TokenSelection(selection.index, selection.mask, selection.count, kept_embeddings=kept)
