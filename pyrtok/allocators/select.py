"""Selection primitives of the allocators: vectorised top-k, exact counts, level quotas, evenly spread orders.

They work on plain tensors (and a token layout), know nothing of policies, and never loop over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.tokens import MultiScaleTokens

__all__ = ["exact_count", "per_level_topk", "spread_priority", "topk_mask", "water_fill"]


def _ranks(order: Tensor) -> Tensor:
    """Inverse permutation of each row: rank of every element in ``order``."""
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def topk_mask(priority: Tensor, k: Tensor) -> Tensor:
    """(B, N) mask of the k_b highest priorities per row; ties go to the lower index.

    Args:
        priority: (B, N) float.
        k: (B,) long, 0 <= k_b <= N.
    """
    order = torch.argsort(priority, dim=1, descending=True, stable=True)
    return _ranks(order) < k.unsqueeze(1)


def exact_count(keep: Tensor, priority: Tensor, k: Tensor, demote: Tensor | None = None) -> Tensor:
    """Adjust a (B, N) keep mask to exactly k_b tokens.

    Tokens are ranked kept first, then the others by priority; ``demote`` (B, N) moves non-kept tokens
    behind every non-demoted one (a lexicographic order, so no arithmetic on priorities).
    """
    order = torch.argsort(priority, dim=1, descending=True, stable=True)
    rank_class = (~keep).to(torch.uint8)
    if demote is not None:
        rank_class = rank_class + (demote & ~keep).to(torch.uint8)
    by_class = torch.argsort(torch.gather(rank_class, 1, order), dim=1, stable=True)
    return _ranks(torch.gather(order, 1, by_class)) < k.unsqueeze(1)


def per_level_topk(tokens: MultiScaleTokens, priority: Tensor, quotas: Tensor) -> Tensor:
    """(B, N) mask keeping the ``quotas[:, l]`` highest-priority tokens of each level l (loop over levels only)."""
    keep = torch.zeros_like(priority, dtype=torch.bool)
    for lvl, level_slice in enumerate(tokens.level_slices):
        keep[:, level_slice] = topk_mask(priority[:, level_slice], quotas[:, lvl])
    return keep


def water_fill(weights: Tensor, capacity: Tensor, total: Tensor) -> Tensor:
    """Integer quotas proportional to ``weights`` without exceeding ``capacity``, summing to ``total``.

    Finds lambda with sum_l min(capacity_l, lambda * weight_l) = total (levels that would overflow are
    filled and the rest is shared again), then rounds by largest remainder.

    Args:
        weights: (B, L) non-negative.
        capacity: (B, L) or (L,) non-negative integers.
        total: (B,) integers with total_b <= sum_l capacity_bl.

    Returns:
        (B, L) long quotas.

    Example:
        >>> water_fill(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([4, 100, 100]), torch.tensor([20]))
        tensor([[ 4,  5, 11]])
    """
    capacity = capacity.expand_as(weights).to(weights.dtype)
    active = capacity > 0
    # A small share proportional to capacity lets zero-weight levels absorb what others cannot take.
    weights = weights.clamp_min(0) + 1e-9 * capacity / capacity.sum(1, keepdim=True).clamp_min(1)
    weights = weights * active
    quota = torch.zeros_like(weights)
    target = total.to(weights.dtype)
    remaining = target
    for _ in range(weights.shape[1]):
        share = weights * active
        scale = remaining / share.sum(1).clamp_min(1e-30)
        proposal = share * scale.unsqueeze(1)
        overflow = active & (proposal >= capacity)
        quota = torch.where(overflow, capacity, torch.where(active, proposal, quota))
        if not bool(overflow.any()):
            break
        active = active & ~overflow
        remaining = target - (quota * ~active).sum(1)
    floor = quota.floor().clamp(max=capacity)
    has_room = floor < capacity
    deficit = (total - floor.sum(1).long()).clamp_min(0)
    bonus = topk_mask(torch.where(has_room, quota - floor, -1.0), deficit) & has_room
    return (floor + bonus).long()


def spread_priority(level_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """(N,) priority in [0, 1) that orders each level's tokens as ever finer uniform subgrids.

    Tokens on the stride-2^k subgrid come before those only on the stride-2^(k-1) one, so the top-r tokens
    of a level are spread evenly over it for every r (the "uniform downsampling" order). Ties are broken
    by the bit-reversed raster index, which interleaves rows and columns.
    """
    parts = []
    for h, w in reversed(level_shapes):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        both = r | c
        # Trailing zeros of r|c (the largest power-of-two stride the cell lies on); 0|0 gets the most.
        stride_class = torch.where(both == 0, torch.full_like(both, 31), (both & -both).float().log2().long())
        raster = r * w + c
        bits = max(1, int(h * w - 1).bit_length())
        reversed_bits = torch.zeros_like(raster)
        for b in range(bits):
            reversed_bits |= ((raster >> b) & 1) << (bits - 1 - b)
        tie = 1.0 - reversed_bits.float() / (1 << bits)
        parts.append((stride_class.float() + tie) / 33.0)
    return torch.cat(parts).to(device)
