"""Redundancy: how similar a token is to its neighbours and to its parent and children across levels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok._cache import tensor_cache
from pyrtok.tokens import MultiScaleTokens


@tensor_cache(maxsize=64)
def _neighbour_table(level_shapes: tuple[tuple[int, int], ...]) -> Tensor:
    """(N, 4) indices of the up/down/left/right neighbours in the same level; -1 where there is none."""
    tables, start = [], 0
    for h, w in reversed(level_shapes):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        columns = []
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            rr, cc = r + dr, c + dc
            valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            columns.append(torch.where(valid, start + rr * w + cc, torch.full_like(rr, -1)))
        tables.append(torch.stack(columns, 1))
        start += h * w
    return torch.cat(tables)


def redundancy(tokens: MultiScaleTokens) -> Tensor:
    """Mean cosine similarity of each token to its in-level neighbours, its parent and its children.

    A token that looks like everything around it (in space and across scales) adds little; high values
    mean redundant.

    Args:
        tokens: features (B, N, D).

    Returns:
        (B, N) scores in [-1, 1].
    """
    features = F.normalize(tokens.features.float(), dim=-1)
    batch, n, _ = features.shape
    neighbours = _neighbour_table(tokens.level_shapes).to(tokens.device)  # (N, 4)
    safe = neighbours.clamp_min(0)
    sims = (features.unsqueeze(2) * features[:, safe]).sum(-1)  # (B, N, 4)
    valid = (neighbours >= 0).to(sims.dtype)
    total = (sims * valid).sum(-1)
    count = valid.sum(-1).expand(batch, n).clone()

    parent = tokens.parent
    has_parent = parent >= 0
    parent_sim = (features * features[:, parent.clamp_min(0)]).sum(-1) * has_parent
    total = total + parent_sim
    count = count + has_parent
    # Children: each token with a parent contributes its similarity to that parent's total.
    total = total.index_add(1, parent.clamp_min(0), parent_sim)
    count = count.index_add(1, parent.clamp_min(0), has_parent.to(count.dtype).expand(batch, n))
    return total / count.clamp_min(1)
