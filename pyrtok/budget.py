"""Budgets: every rule that turns what a user asks for into token counts, in one place.

- :func:`budget_tokens`: a count or a fraction of an image's N tokens -> the count it means (fractions round up);
- :func:`resolve_budget`: an allocator's budget argument (an int or a (B,) tensor) -> (B,) counts capped at N;
- :func:`sample_budgets`: a VLM call's budget (an int, a float fraction, a (B,) tensor or None) -> the budget of
  every image of a batch, each image's own or, with ``share``, its share of its sample's budget;
- :func:`stage_budgets`: an in-LLM stage's ``keep`` fraction of the image tokens present -> (B,) counts;
- :func:`schedule_counts`: the image tokens an in-LLM schedule keeps after each stage, by pyrtok's per-stage rounding
  or by PyramidDrop's own (a truncated share of the tokens that entered);
- :func:`dart_counts`: DART's pivots and the tokens each pivot keeps, by the authors' formula.

The allocators, the VLM adapter, the in-LLM schedules, training and the ablation runner all count through here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ROUNDINGS", "budget_tokens", "dart_amounts", "dart_counts", "image_shares", "resolve_budget",
           "sample_budgets", "schedule_counts", "stage_budgets"]

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


def per_sample(budget: int | Tensor, batch: int) -> list[int]:
    """An int or a (B,) (or 0-d) integer tensor of token counts -> B ints, validated."""
    if isinstance(budget, Tensor):
        if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
            raise TypeError(f"a budget tensor holds token counts and must have an integer dtype, got {budget.dtype}; "
                            "pass a float (not a tensor) for a fraction of each image's tokens")
        if budget.dim() == 0:
            return [int(budget)] * batch
        if budget.shape != (batch,):
            raise ValueError(f"budget tensor must have shape ({batch},) (one per sample), got {tuple(budget.shape)}")
        values = [int(v) for v in budget.tolist()]
        if any(v < 1 for v in values):
            raise ValueError(f"budget must be >= 1 for every sample, got {values}")
        return values
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be a positive int, a float fraction in (0, 1] or a (B,) integer tensor, "
                         f"got {budget!r}")
    return [int(budget)] * batch


def image_shares(budget: int, sizes: list[int], sample: int = 0) -> list[int]:
    """One sample's ``budget`` split over its images of ``sizes`` tokens, in proportion to their tokens.

    Rounded down, the remainder to the earliest images; an image left with none takes one from the largest
    share, so the shares add up to the budget, which must be at least the number of images.

    Example:
        >>> image_shares(10, [100, 100, 50]), image_shares(3, [1000, 1, 1])
        ([4, 4, 2], [1, 1, 1])
    """
    if budget < len(sizes):
        raise ValueError(f"budget for sample {sample} is {budget} tokens, fewer than its {len(sizes)} images: with "
                         "share_budget each image keeps at least one token")
    total = sum(sizes)
    shares = [budget * n // total for n in sizes]
    for k in range(budget - sum(shares)):
        shares[k % len(shares)] += 1
    for k in [k for k, share in enumerate(shares) if share == 0]:
        shares[max(range(len(shares)), key=shares.__getitem__)] -= 1
        shares[k] = 1
    return shares


def sample_budgets(budget: int | float | Tensor | None, owner: list[int], sizes: list[int],
                   share: bool = False) -> list[int]:
    """The token budget of each image of a batch.

    Args:
        budget: None (keep every token), a float fraction in (0, 1] of each image's own tokens, or an int or
            (B,) integer tensor of tokens per sample (per image; with ``share`` for the sample as a whole).
        owner: (I,) the sample of each image, images in prompt order.
        sizes: (I,) the tokens of each image.
        share: split a sample's budget over its images (:func:`image_shares`) instead of giving each image
            the whole budget.

    Returns:
        (I,) counts. Counts above an image's tokens are left as they are (allocators cap them).

    Example:
        >>> sample_budgets(0.5, [0, 0, 1], [10, 20, 30]), sample_budgets(8, [0, 0, 1], [10, 30, 5], share=True)
        ([5, 10, 15], [2, 6, 8])
    """
    if budget is None:
        return list(sizes)
    if isinstance(budget, float):
        return [int(budget_tokens(budget, n)) for n in sizes]
    batch = max(owner) + 1 if owner else 0
    values = per_sample(budget, batch)
    if not share:
        return [values[b] for b in owner]
    out = [0] * len(owner)
    for b in range(batch):
        members = [i for i, o in enumerate(owner) if o == b]
        if len(members) == 1:
            out[members[0]] = values[b]
            continue
        for i, value in zip(members, image_shares(values[b], [sizes[i] for i in members], b), strict=True):
            out[i] = value
    return out


def stage_budgets(keep: float, image_counts: Tensor) -> Tensor:
    """(B,) image tokens each sample keeps at an in-LLM stage: ``keep`` of its (B,) ``image_counts``, rounded up
    by :func:`budget_tokens` (at least 1, 0 for a sample without image tokens)."""
    out = [budget_tokens(float(keep), int(n)) if int(n) > 0 else 0 for n in image_counts.tolist()]
    return torch.tensor(out, dtype=torch.long, device=image_counts.device)


ROUNDINGS = ("cumulative", "per_stage")


def schedule_counts(keeps: Sequence[float], entering: int, rounding: str = "cumulative") -> list[int]:
    """The image tokens a sample keeps after each stage of an in-LLM schedule: ``[n0, c1, ..., cS]``.

    Args:
        keeps: (S,) per stage, the fraction in (0, 1] of the image tokens present at that stage.
        entering: ``n0``, the image tokens entering the language model.
        rounding: ``"cumulative"`` (PyramidDrop's released code, ``modeling_llama_pdrop.py`` lines 1306-1307):
            ``c_s = int(n0 * r_s)``, a truncated share of the tokens that *entered*, with ``r_s`` the product of
            ``keeps[:s]`` rounded to 12 decimals (the authors write their ratio lists as decimal literals,
            ``[0.5, 0.25, 0.125]``; 0.7 * 0.7 is 0.48999999999999994 in floating point, the literal 0.49), so it can
            reach 0; ``"per_stage"`` (pyrtok's own rule): ``c_s`` = ``keeps[s]`` of ``c_{s-1}``, rounded up by
            :func:`budget_tokens` (at least 1 while any is present).

    Example:
        >>> schedule_counts([0.3, 0.3], 196), schedule_counts([0.3, 0.3], 196, "per_stage")
        ([196, 58, 17], [196, 59, 18])
        >>> schedule_counts([0.7, 0.7], 100), schedule_counts([0.5] * 3, 576)
        ([100, 70, 49], [576, 288, 144, 72])
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if isinstance(entering, bool) or not isinstance(entering, numbers.Integral) or entering < 0:
        raise ValueError(f"entering must be an int >= 0 (image tokens), got {entering!r}")
    counts, ratio = [int(entering)], 1.0
    for keep in keeps:
        if rounding == "per_stage":
            counts.append(int(budget_tokens(float(keep), counts[-1])) if counts[-1] > 0 else 0)
        else:
            ratio *= float(keep)
            counts.append(min(counts[-1], int(entering * round(ratio, 12))))
    return counts


def dart_amounts(keep: float | None = None, max_num_trunction: int | None = None,
                 reduction_ratio: float | None = None) -> dict[str, float | int]:
    """The DART amounts given (at most one of ``keep``, ``max_num_trunction`` and ``reduction_ratio``), by name.

    Raises:
        ValueError: more than one given.
    """
    given = {name: value for name, value in (("keep", keep), ("max_num_trunction", max_num_trunction),
                                             ("reduction_ratio", reduction_ratio)) if value is not None}
    if len(given) > 1:
        raise ValueError(f"give one of keep, max_num_trunction and reduction_ratio, got {given}")
    return given


def dart_counts(entering: int, pivots: int, text_pivots: int, keep: float | None = None,
                max_num_trunction: int | None = None, text_found: int | None = None,
                reduction_ratio: float | None = None) -> tuple[int, int, int]:
    """DART's counts as its released code computes them: ``(image pivots, tokens per pivot, tokens kept)``.

    Give one of three amounts. ``max_num_trunction`` (the official LLaVA code): each of the ``pivots +
    text_pivots`` pivots keeps ``max_num_trunction // (pivots + text_pivots)`` image tokens. ``reduction_ratio``
    (the official Qwen2-VL and Qwen2.5-VL code, and the llmc port): ``int(n0 * (1 - reduction_ratio) / (pivots +
    text_pivots))``. ``keep``: ``ceil((n0 * keep) // (pivots + text_pivots))``, the same count up to float rounding
    of ``1 - reduction_ratio``. The kept count is the image pivots plus what the pivots keep, which is not the
    budget: ``max_num_trunction=128`` with 4 + 4 pivots keeps 4 + 8 x 16 = 132 of 576. Where the released code
    would fail (fewer image tokens than pivots, fewer text tokens than ``text_pivots``, a pivot asking for more
    tokens than are left) the counts are capped by what there is. ``text_found``: the text pivots found (default
    ``text_pivots``).

    Example:
        >>> dart_counts(576, 4, 4, max_num_trunction=128), dart_counts(576, 4, 4, keep=0.222)
        ((4, 16, 132), (4, 15, 124))
        >>> dart_counts(576, 4, 4, reduction_ratio=0.778)  # the Qwen ports' default
        (4, 15, 124)
        >>> dart_counts(20, 4, 4, max_num_trunction=128)  # the first pivots take every token left
        (4, 16, 20)
    """
    if not dart_amounts(keep, max_num_trunction, reduction_ratio):
        raise ValueError("give one of keep, max_num_trunction and reduction_ratio, got none")
    if entering <= 0:
        return 0, 0, 0
    total = pivots + text_pivots
    if max_num_trunction is not None:
        per = int(max_num_trunction // total)
    elif reduction_ratio is not None:
        per = int(entering * (1 - reduction_ratio) / total)
    else:
        per = math.ceil((entering * keep) // total)
    image = min(pivots, entering)
    found = text_pivots if text_found is None else min(text_found, text_pivots)
    return image, per, image + min(entering - image, per * (image + found))
