"""Foveated selection: fine tokens near a fixation, coarse ones in the periphery.

Cortical magnification M(e) = M0 / (e + e0) gives the sampling density wanted at eccentricity e
(distance from the fixation, as a fraction of the image diagonal). A token of size s at eccentricity e
has priority log(s * M(e)) = log s - log(e + e0) + const: thresholding it keeps, at each eccentricity,
the tokens no finer than the local magnification asks for, so the kept set is the fovea's fine grid
surrounded by ever coarser rings, and the budget sets how far each ring reaches. M0 only shifts the
threshold, so it does not appear.

The fixation is the box centre of the most query-relevant finest-level token when a query is given,
otherwise the peak of the (blurred) saliency map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.signals.query import query_relevance
from pyrtok.signals.saliency import spectral_residual
from pyrtok.tokens import MultiScaleTokens


def fixation(
    tokens: MultiScaleTokens, image: Tensor | None, query: Tensor | None, *, check_finite: bool = True
) -> Tensor:
    """(B, 2) fixation ``(x, y)`` in level-0 pixels, from (B, D) or (D,) ``query`` or else (B, C, H, W) ``image``.

    ``check_finite``: reject NaN/inf images (skip it when the caller has already checked them).
    """
    centres = (tokens.box[:, :2] + tokens.box[:, 2:]) / 2  # (N, 2)
    if query is not None:
        relevance = query_relevance(tokens, query)
        relevance = relevance.masked_fill((tokens.level != 0).unsqueeze(0), float("-inf"))
        return centres[relevance.argmax(1)]
    if image is None:
        raise ValueError("foveated allocation needs image= (saliency fixation) or query= (relevance fixation)")
    maps = spectral_residual(image, full_size=False, check_finite=check_finite)  # only the peak's position counts
    height, width = maps.shape[-2:]
    peak = maps.flatten(1).argmax(1)
    scale = torch.tensor([tokens.image_size[1] / width, tokens.image_size[0] / height], device=tokens.device)
    return torch.stack([(peak % width).float() + 0.5, (peak // width).float() + 0.5], 1).to(tokens.device) * scale


@register("foveated")
class FoveatedTokens(Allocator):
    """Priority log(size) - log(eccentricity + e0) around a fixation (see module notes).

    Args:
        e0: eccentricity offset of the magnification, as a fraction of the image diagonal.
    """

    needs = ()

    def __init__(self, e0: float = 0.05, **options) -> None:
        super().__init__(**options)
        if not float(e0) > 0:
            raise ValueError(f"e0 must be > 0, got {e0!r}")
        self.e0 = float(e0)

    def reads(self, ctx: Context) -> tuple[str, ...]:
        # The fixation comes from the query when there is one, else from the image's saliency.
        return ("query", "features") if ctx.query is not None else ("image",)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        fix = fixation(tokens, ctx.image, ctx.query, check_finite=ctx.unchecked("image"))  # (B, 2)
        centres = (tokens.box[:, :2] + tokens.box[:, 2:]) / 2
        diagonal = float(torch.tensor(tokens.image_size, dtype=torch.float32).norm())
        eccentricity = (centres.unsqueeze(0) - fix.unsqueeze(1)).norm(dim=-1) / diagonal  # (B, N)
        size = (tokens.box[:, 2] - tokens.box[:, 0]).clamp_min(1e-6)
        return torch.log(size).unsqueeze(0) - torch.log(eccentricity + self.e0)
