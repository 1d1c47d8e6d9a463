"""FastV (Chen et al., 2024): one stage ranking image tokens by the last prompt token's attention."""

from __future__ import annotations

from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, attention_rule, check_keep, check_layer

__all__ = ["FastV"]

@SCHEDULES.register("fastv")
class FastV(Schedule):
    """FastV: after layer ``layer - 1``, keep ``keep`` of the image tokens, ranked by the last prompt token's
    attention in layer ``layer - 1``. Args: ``layer`` (>= 1; FastV's K, default 2), ``keep`` (default 0.5)."""

    def __init__(self, layer: int = 2, keep: float = 0.5) -> None:
        self.layer = check_layer(layer, "layer", 1)
        self.keep = check_keep(keep)
        self.stages = [Stage(self.layer - 1, self.layer, self.keep, attention_rule)]

    def describe(self) -> str:
        return f"fastv(layer={self.layer}, keep={self.keep:g})"
