"""PyramidDrop (Xing et al., 2024): a stage at each of several layers, each keeping a share of what is left."""

from __future__ import annotations

from collections.abc import Sequence

from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, attention_rule, check_keep, check_layer

__all__ = ["PyramidDrop"]

@SCHEDULES.register("pdrop")
class PyramidDrop(Schedule):
    """PyramidDrop: at each of ``layers`` (increasing), keep ``keep`` of the image tokens still present, ranked by
    the last instruction token's attention in that layer. ``keep``: one fraction, or one per stage."""

    def __init__(self, layers: Sequence[int] = (8, 16, 24), keep: float | Sequence[float] = 0.5) -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
            raise ValueError(f"layers must be a non-empty list of decoder layer indices, got {layers!r}")
        self.layers = [check_layer(v, f"layers[{i}]", 0) for i, v in enumerate(layers)]
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
            if len(keep) != len(self.layers):
                raise ValueError(f"keep must be one fraction or one per stage ({len(self.layers)}), got {keep!r}")
            self.keep = [check_keep(v, f"keep[{i}]") for i, v in enumerate(keep)]
        else:
            self.keep = [check_keep(keep)] * len(self.layers)
        self.stages = [Stage(layer, layer, k, attention_rule) for layer, k in zip(self.layers, self.keep,
                                                                                  strict=True)]

    def describe(self) -> str:
        keep = self.keep[0] if len(set(self.keep)) == 1 else self.keep
        return f"pdrop(layers={self.layers}, keep={keep if isinstance(keep, list) else format(keep, 'g')})"
