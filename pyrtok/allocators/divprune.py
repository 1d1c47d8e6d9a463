"""DivPrune: keep a maximally diverse subset of the tokens (greedy max-min cosine distance).

DivPrune treats pruning as a max-min diversity problem on the cosine distance 1 - cos(f_i, f_j) of the token
features. Its greedy solution picks first the token farthest from its nearest neighbour, then repeatedly the
token whose distance to the kept set (its distance to the nearest kept token) is largest. The first K picks do
not depend on K, so the pick order is a priority: one greedy pass up to the largest budget of the batch serves
every sample's budget, and the pass is vectorised over the batch (a loop over the K steps only, never over
tokens or samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.scales import candidate_slice, candidates_first, check_scales
from pyrtok.tokens import MultiScaleTokens

__all__ = ["DivPruneTokens", "max_min_order"]


def max_min_order(features: Tensor, steps: int) -> Tensor:
    """The first ``steps`` picks of greedy max-min diversity on cosine distance, per sample.

    Pick 1 is the token farthest from its nearest neighbour; pick t + 1 is the token, not yet picked, farthest
    from the picked set (the largest distance to its nearest picked token). Ties go to the lower index.

    Args:
        features: (B, n, D) token features (finite).
        steps: picks to make, 1 <= steps <= n.

    Returns:
        (B, steps) long indices into n, in pick order, distinct in each row.

    Example:
        >>> f = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.1]]])
        >>> max_min_order(f, 3).tolist()
        [[3, 0, 2]]
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (B, n, D) tensor, got {getattr(features, 'shape', features)}")
    batch, n, _ = features.shape
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an int in [1, {n}], got {steps!r}")
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, n, n)
    rows = torch.arange(batch, device=features.device)
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    # A lone token has no neighbour: its nearest-neighbour distance is +inf and it is picked first.
    nearest = distance.masked_fill(eye, float("inf")).amin(dim=2)
    pick = nearest.argmax(dim=1)
    picks = [pick]
    to_set = distance[rows, pick]  # (B, n) distance of every token to its nearest picked token
    # Picked tokens sit at -inf (a minimum keeps them there), so duplicates (distance 0 to the set) and zero
    # features can never be picked twice.
    to_set[rows, pick] = float("-inf")
    for _ in range(steps - 1):
        pick = to_set.argmax(dim=1)
        picks.append(pick)
        to_set = torch.minimum(to_set, distance[rows, pick])
        to_set[rows, pick] = float("-inf")
    return torch.stack(picks, dim=1)


@register("divprune")
class DivPruneTokens(Allocator):
    """Greedy max-min diversity on the cosine distance of the token features (DivPrune).

    Args:
        scales: ``"finest"`` (default, as published: diversity among the finest level's tokens; coarser ones
            only fill a budget above the finest level's size, coarsest first) or ``"all"`` (every level's tokens
            are candidates, compared in the one feature space they share).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.randn(2, 4, 4, 8), 2)
        >>> DivPruneTokens()(tokens, torch.tensor([3, 5])).count.tolist()
        [3, 5]
    """

    def __init__(self, scales: str = "finest", **options) -> None:
        super().__init__(**options)
        self.scales = check_scales(scales)

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("features",)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        candidates = candidate_slice(tokens, self.scales)
        features = tokens.features[:, candidates]
        n = features.shape[1]
        steps = min(n, int(budgets.max()))
        order = max_min_order(features, steps)  # (B, steps)
        # Picked tokens score by pick order; the rest of the candidates come after them.
        score = torch.full(features.shape[:2], -float(steps), device=tokens.device)
        score.scatter_(1, order, -torch.arange(steps, device=tokens.device, dtype=torch.float32).expand_as(order))
        full = torch.zeros(tokens.features.shape[:2], device=tokens.device)
        full[:, candidates] = score
        return candidates_first(full, candidates)
