"""Which tokens a published method chooses among: the finest level only (as published) or every level.

The published vision-side methods (FasterVLM, VisionZip, DivPrune) were defined on one patch grid. Here each of
them runs on the finest level by default (``scales="finest"``, the published setting) or over the whole
multi-scale token set (``scales="all"``), so an ablation shows whether scales help each method. The finest
level is one contiguous run at the end of the canonical order, so the candidates are always a slice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.tokens import MultiScaleTokens

__all__ = ["SCALES", "candidate_slice", "candidates_first", "check_scales"]

SCALES = ("finest", "all")


def check_scales(scales: object) -> str:
    """``scales`` if it is one of :data:`SCALES`, else a ValueError naming it."""
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {SCALES} (the finest level only, or every level), got {scales!r}")
    return scales


def candidate_slice(tokens: MultiScaleTokens, scales: str) -> slice:
    """The slice of the canonical order (N,) a method chooses among: level 0, or every token."""
    return tokens.level_slices[0] if scales == "finest" else slice(0, tokens.num_tokens)


def candidates_first(score: Tensor, candidates: slice) -> Tensor:
    """(B, N) priority ranking every candidate above every other token, each group by ``score`` (B, N).

    Ranks (not scores) make the two groups separable whatever the scores hold (+inf attention included); ties
    keep the lower index first, as :func:`~pyrtok.allocators.select.topk_mask` does. Other tokens only fill
    budgets larger than the candidates.

    Example:
        >>> candidates_first(torch.tensor([[5.0, 1.0, 2.0, 3.0]]), slice(2, 4))
        tensor([[-2., -3., -1., -0.]])
    """
    batch, n = score.shape
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    outside = torch.ones(n, dtype=torch.long, device=score.device)
    outside[candidates] = 0
    # A stable sort of the score order by group: candidates in score order, then the others in score order.
    by_group = torch.argsort(outside.expand(batch, -1).gather(1, order), dim=1, stable=True)
    final = torch.empty_like(order).scatter_(1, torch.gather(order, 1, by_group),
                                             torch.arange(n, device=score.device).expand(batch, -1))
    return -final.float()
