"""Budgets: token counts per sample, and the one rule that turns a fraction of the tokens into a count."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["budget_tokens", "resolve_budget"]

# A fraction whose product with N lands within this many tokens above an integer k means k tokens: 0.07 of 100
# is 7 although 0.07 * 100 is 7.000000000000001 in float64 (and 7.00000003 from a float32 0.07).
_SLACK = 1e-6


def budget_tokens(budget: int | float | Tensor, num_tokens: int) -> int | Tensor:
    """The token count a budget means for an image of ``num_tokens`` tokens.

    An int is a count (capped at ``num_tokens``); a float in (0, 1] is a fraction, rounded up, at least 1. A
    product within 1e-6 above an integer counts as that integer, so 0.07 of 100 tokens is 7, not 8, despite
    floating-point error (in float64 or float32). A floating-point tensor
    of fractions (any shape) gives a long tensor of counts by the same rule, computed in float64: the
    ablation harness, the adapters and training all round through here.

    Example:
        >>> budget_tokens(0.07, 100), budget_tokens(0.11, 261), budget_tokens(500, 261), budget_tokens(1.0, 261)
        (7, 29, 261, 261)
        >>> budget_tokens(torch.tensor([0.07, 0.5, 1.0]), 100)
        tensor([  7,  50, 100])
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if isinstance(budget, Tensor):
        if not budget.is_floating_point():
            raise TypeError(f"a budget tensor holds fractions and must be floating point, got {budget.dtype}")
        if bool(((budget <= 0) | (budget > 1) | budget.isnan()).any()):
            raise ValueError("a budget tensor holds fractions of the tokens, each in (0, 1]")
        return (budget.double() * num_tokens - _SLACK).ceil().long().clamp(1, int(num_tokens))
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Integral, float)):
        raise TypeError(f"budget must be an int token count or a float fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"a float budget is a fraction of the tokens and must be in (0, 1], got {budget}")
        return min(num_tokens, max(1, math.ceil(budget * num_tokens - _SLACK)))
    if budget < 1:
        raise ValueError(f"budget must be a positive token count, got {budget}")
    return min(int(budget), num_tokens)


def resolve_budget(budget: int | Tensor, batch_size: int, num_tokens: int, device: torch.device) -> Tensor:
    """Validate ``budget`` (an int or a (B,) integer tensor) and return min(budget_b, N) as (B,) long."""
    if isinstance(budget, bool):
        raise TypeError(f"budget must be an int or a (B,) integer tensor, got bool {budget!r}")
    if isinstance(budget, numbers.Integral):
        budget = int(budget)
        if budget <= 0:
            raise ValueError(f"budget must be >= 1, got {budget}")
        return torch.full((batch_size,), min(budget, num_tokens), dtype=torch.long, device=device)
    if not isinstance(budget, Tensor):
        raise TypeError(f"budget must be an int or a (B,) integer tensor, got {type(budget).__name__}")
    if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
        raise TypeError(f"budget tensor must have an integer dtype, got {budget.dtype}")
    if budget.dim() == 0:
        budget = budget.expand(batch_size)
    if budget.shape != (batch_size,):
        raise ValueError(f"budget tensor must have shape ({batch_size},) (one per sample), got {tuple(budget.shape)}")
    if bool((budget <= 0).any()):
        raise ValueError(f"budget must be >= 1 for every sample, got {budget.tolist()}")
    return budget.to(device=device, dtype=torch.long).clamp_max(num_tokens)
