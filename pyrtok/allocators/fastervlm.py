"""FasterVLM: keep the tokens the [CLS] token attends to most.

FasterVLM ranks image tokens by the attention of the [CLS] token at the vision tower's feature layer (the
penultimate layer LLaVA takes its features from), averaged over heads, and keeps the top K. That is exactly
``tokens.attention`` as the encoders capture it (:meth:`~pyrtok.encoders.towers.VisionTower.attention_row`:
the [CLS] row of the feature layer's softmax, heads averaged). Coarser levels carry the mean attention of the
cells they cover (a density), so ``scales="all"`` ranks every level on one scale.
"""

from __future__ import annotations

from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.scales import candidate_slice, candidates_first, check_scales
from pyrtok.signals.attention import cls_attention
from pyrtok.tokens import MultiScaleTokens

__all__ = ["FasterVLMTokens"]


@register("fastervlm")
class FasterVLMTokens(Allocator):
    """Top-K [CLS] attention (FasterVLM).

    Args:
        scales: ``"finest"`` (default, as published: the finest level's tokens; coarser ones only fill a budget
            above the finest level's size) or ``"all"`` (one global top-K over every level).

    Example:
        >>> import torch
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.rand(1, 4, 4, 8), 2, attention=torch.rand(1, 4, 4))
        >>> selection = FasterVLMTokens()(tokens, 3)
        >>> bool((tokens.level[selection.index[0]] == 0).all()), int(selection.count[0])
        (True, 3)
    """

    needs = ("attention",)
    views = "stacked"  # the released LLaVA-NeXT code: every view on its own, tiles joined without unpadding

    def __init__(self, scales: str = "finest", **options) -> None:
        super().__init__(**options)
        self.scales = check_scales(scales)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        attention = cls_attention(tokens)
        if self.scales == "all":
            return attention
        return candidates_first(attention, candidate_slice(tokens, self.scales))
