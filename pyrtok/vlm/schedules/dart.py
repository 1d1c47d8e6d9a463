"""DART (Wen et al., 2025): keep the image tokens least duplicated by a few pivot tokens."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok.vlm.decode import LayerView
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, check_keep, check_layer

__all__ = ["DART", "duplication_keep"]

@SCHEDULES.register("dart")
class DART(Schedule):
    """DART (duplication-aware): at layer ``layer``, pivots, then per pivot the image tokens least similar to it.

    Args:
        layer: the first layer that runs on the kept tokens (its input is observed), >= 1; default 2.
        keep: fraction of the image tokens kept; default 0.25.
        pivots: image pivots (largest L1 norm of the layer's input); default 4.
        text_pivots: instruction-token pivots (tokens after the last image token, largest L1 norm); default 4.
    """

    def __init__(self, layer: int = 2, keep: float = 0.25, pivots: int = 4, text_pivots: int = 4) -> None:
        self.layer = check_layer(layer, "layer", 1)
        self.keep = check_keep(keep)
        if isinstance(pivots, bool) or not isinstance(pivots, numbers.Integral) or pivots < 1:
            raise ValueError(f"pivots must be a positive int, got {pivots!r}")
        if isinstance(text_pivots, bool) or not isinstance(text_pivots, numbers.Integral) or text_pivots < 0:
            raise ValueError(f"text_pivots must be an int >= 0, got {text_pivots!r}")
        self.pivots, self.text_pivots = int(pivots), int(text_pivots)
        self.stages = [Stage(self.layer, self.layer, self.keep, self._rule)]

    def describe(self) -> str:
        return (f"dart(layer={self.layer}, keep={self.keep:g}, pivots={self.pivots}, "
                f"text_pivots={self.text_pivots})")

    def _rule(self, view: LayerView, budgets: Tensor) -> Tensor:
        return duplication_keep(view.hidden, view.final_norm(view.hidden), view.image & view.valid,
                                view.valid, budgets, self.pivots, self.text_pivots)


def duplication_keep(hidden: Tensor, normed: Tensor, image: Tensor, valid: Tensor, budgets: Tensor,
                     pivots: int, text_pivots: int) -> Tensor:
    """DART's duplication rule: (B, T) bool of the image tokens kept.

    ``hidden`` (B, T, D) ranks pivots by L1 norm: ``min(pivots, budget)`` image tokens, and ``text_pivots``
    valid non-image tokens after the sample's last image token. Each pivot in turn (image pivots by descending
    norm, then text pivots) keeps the image tokens whose ``normed`` (B, T, D) states are least cosine-similar to
    its own, among those not yet kept: the ``budget - image pivots`` extra tokens are split evenly over the
    pivots, the first ones taking one more when it does not divide. ``image`` (B, T) marks the candidates.
    """
    keep = torch.zeros_like(image)
    strength = hidden.float().abs().sum(-1)
    columns = torch.arange(image.shape[1], device=image.device)
    for b in range(image.shape[0]):
        budget = int(budgets[b])
        if budget == 0:
            continue
        candidates = image[b].clone()
        count = int(candidates.sum())
        first = min(pivots, budget)
        chosen = strength[b].masked_fill(~candidates, float("-inf")).topk(first).indices
        order = [int(c) for c in chosen]
        candidates[chosen] = False
        keep[b, chosen] = True
        if text_pivots and count:
            last = int(columns[image[b]].max())
            text = valid[b] & ~image[b] & (columns > last)
            found = min(text_pivots, int(text.sum()))
            if found:
                order += [int(c) for c in strength[b].masked_fill(~text, float("-inf")).topk(found).indices]
        extra = budget - first
        if not extra:
            continue
        share, remainder = divmod(extra, len(order))
        vectors = F.normalize(normed[b].float(), dim=-1)
        for j, pivot in enumerate(order):
            take = min(share + int(j < remainder), int(candidates.sum()))
            if not take:
                continue
            similarity = (vectors @ vectors[pivot]).masked_fill(~candidates, float("inf"))
            picked = (-similarity).topk(take).indices
            keep[b, picked] = True
            candidates[picked] = False
    return keep
