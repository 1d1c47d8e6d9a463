"""What an in-LLM dropping schedule is: :class:`Stage` s at chosen decoder layers, and the schedule registry.

A schedule is a list of :class:`Stage` s. A stage observes the input of one decoder layer (``observe``), chooses
which image tokens survive, and every layer from ``layer`` on runs on the kept tokens only; a stage that
``renumber`` s gives the kept sequence fresh positions (PyramidDrop). How many image tokens each stage keeps is
the schedule's own rule, :meth:`Schedule.stage_counts` (by default ``keep``, a fraction of the image tokens
present at that stage, rounded up by :func:`pyrtok.budget.schedule_counts`). The loop that runs a schedule, and
the attention a rule may read, are :mod:`pyrtok.vlm.decode`'s. Each method is one module of this package
registered in :data:`SCHEDULES`; pyrtok's departures from a method's released code are options of it, named in
its :attr:`Schedule.variants`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyrtok.budget import schedule_counts
from pyrtok.registry import Registry
from pyrtok.vlm.decode import LayerView, attention_to_last

__all__ = ["SCHEDULES", "Schedule", "Stage", "attention_rule", "check_choice", "check_keep", "check_layer", "top"]


@dataclass
class Stage:
    """One dropping step: observe the input of layer ``observe``; layers ``layer`` and later see the kept tokens.

    ``rule`` takes the :class:`LayerView` and the (B,) number of image tokens to keep (the schedule's
    :meth:`Schedule.stage_counts`) and returns a (B, T) bool mask of the image tokens kept. ``keep``: the
    fraction of the image tokens present that the stage keeps, where the method counts that way (None where it
    does not, e.g. DART's fixed token counts). ``renumber``: after the drop, a sample that lost tokens gets
    positions 0 .. T'-1 over what it kept (see :mod:`pyrtok.vlm.decode`).
    """

    observe: int
    layer: int
    keep: float | None
    rule: Callable[[LayerView, Tensor], Tensor]
    renumber: bool = False


class Schedule:
    """Base class: a named list of :attr:`stages`, in layer order."""

    name: ClassVar[str] = ""
    #: pyrtok's named departures from the method's released code: variant name -> the options that give it
    #: (``create_schedule(name, **variants[v])``); the schedule contract test runs each of them too.
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    stages: list[Stage]

    def describe(self) -> str:
        raise NotImplementedError

    def stage_counts(self, entering: int) -> list[int]:
        """``[n0, c1, ..., cS]``: the image tokens a sample keeps after each stage when ``entering`` (n0) image
        tokens enter the language model. By default each stage keeps its ``keep`` of the tokens present, rounded
        up (:func:`pyrtok.budget.schedule_counts` with ``rounding="per_stage"``); methods whose released code
        counts otherwise override it."""
        return schedule_counts([stage.keep for stage in self.stages], entering, "per_stage")

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


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return str(value)


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
