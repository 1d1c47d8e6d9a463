"""[CLS]-attention selection over every level: FasterVLM's rule on the whole multi-scale token set.

``cls_attention`` is kept as the project's multi-scale variant under its own name (configs and tables written
before FasterVLM was registered keep working): it is :class:`~pyrtok.allocators.fastervlm.FasterVLMTokens` with
``scales="all"``, one global top-k over the [CLS] attention of every level, and selects exactly what
``create("fastervlm", scales="all")`` selects.
"""

from __future__ import annotations

from pyrtok.allocators.fastervlm import FasterVLMTokens
from pyrtok.allocators.registry import register


@register("cls_attention")
class ClsAttentionTokens(FasterVLMTokens):
    """Global top-k over the [CLS] attention the encoder captured (``tokens.attention``), every level.

    Args:
        scales: ``"all"`` by default; ``"finest"`` makes it ``fastervlm``.
    """

    views = "joint"  # pyrtok's own: one choice over every view and level

    def __init__(self, scales: str = "all", **options) -> None:
        super().__init__(scales=scales, **options)
