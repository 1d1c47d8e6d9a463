"""What an in-LLM dropping schedule is: :class:`Stage` s at chosen decoder layers, and the schedule registry.

A schedule is a list of :class:`Stage` s. A stage observes the input of one decoder layer (``observe``), chooses
which image tokens survive, and every layer from ``layer`` on runs on the kept tokens only. ``keep`` is a
fraction of the image tokens present at that stage, rounded up by :func:`pyrtok.budget.stage_budgets`. The
loop that runs a schedule, and the attention a rule may read, are :mod:`pyrtok.vlm.decode`'s. Each method is
one module of this package registered in :data:`SCHEDULES`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyrtok.registry import Registry
from pyrtok.vlm.decode import LayerView, attention_to_last

__all__ = ["SCHEDULES", "Schedule", "Stage", "attention_rule", "check_keep", "check_layer", "top"]


@dataclass
class Stage:
    """One dropping step: observe the input of layer ``observe``; layers ``layer`` and later see the kept tokens.

    ``rule`` takes the :class:`LayerView` and the (B,) number of image tokens to keep and returns a (B, T) bool
    mask of the image tokens kept.
    """

    observe: int
    layer: int
    keep: float
    rule: Callable[[LayerView, Tensor], Tensor]


class Schedule:
    """Base class: a named list of :attr:`stages`, in layer order."""

    name: ClassVar[str] = ""
    stages: list[Stage]

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.describe()

    def check_layers(self, num_layers: int) -> None:
        """Raise a ValueError unless every stage fits a language model of ``num_layers`` decoder layers."""
        for stage in self.stages:
            if stage.layer >= num_layers:
                raise ValueError(f"{self.describe()} drops at layer {stage.layer} but the language model has "
                                 f"{num_layers} layers (0 .. {num_layers - 1})")


SCHEDULES: Registry[Schedule] = Registry("schedule", Schedule)


def check_keep(value: Any, argument: str = "keep") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ValueError(f"{argument} must be a fraction in (0, 1] of the image tokens present, got {value!r}")
    return float(value)


def check_layer(value: Any, argument: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{argument} must be an int >= {low} (a decoder layer index), got {value!r}")
    return int(value)


def top(scores: Tensor, candidates: Tensor, budgets: Tensor) -> Tensor:
    """(B, T) bool: the ``budgets[b]`` best-scoring candidates of each row (ties: earlier column first)."""
    scores = scores.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return candidates & (rank < budgets[:, None])


def attention_rule(view: LayerView, budgets: Tensor) -> Tensor:
    """Keep the image tokens the last prompt token attends to most in ``view``'s layer (FastV, PyramidDrop)."""
    return top(attention_to_last(view), view.image & view.valid, budgets)
