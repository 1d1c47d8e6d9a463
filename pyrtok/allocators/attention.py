"""[CLS]-attention selection (FasterVLM-like): keep the tokens the [CLS] token attends to most."""

from __future__ import annotations

from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.signals.attention import cls_attention
from pyrtok.tokens import MultiScaleTokens


@register("cls_attention")
class ClsAttentionTokens(Allocator):
    """Global top-k over the [CLS] attention the encoder captured (``tokens.attention``)."""

    needs = ("attention",)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        return cls_attention(tokens)
