"""In-LLM token dropping: schedules that decide, at chosen decoder layers, which image tokens go on.

One module per method, each registered in :data:`SCHEDULES`; the loop that runs them is :mod:`pyrtok.vlm.decode`.

- ``fastv`` (FastV): one stage; the last prompt token's attention inside layer ``layer - 1`` (averaged over
  heads) ranks the image tokens; layers ``layer`` and later see the top ``keep``.
- ``pdrop`` (PyramidDrop): a stage at each of ``layers``; at each, the last instruction token's attention in
  that layer ranks the image tokens still present, and that layer already runs on the top ``keep``.
- ``dart`` (DART, duplication): at layer ``layer``, ``pivots`` image tokens with the largest L1 norm of the
  layer's input (and ``text_pivots`` instruction tokens after the image) are pivots; each pivot in turn keeps
  the image tokens least similar (cosine, on the final-norm'd hidden states) to it among those not yet kept,
  so near-duplicates of what is kept go. Image pivots are kept; the total is exactly the stage's budget.

Kept tokens keep their positions. Scores that need attention come from the layer's own norm, q/k projections
(and q/k norms) and rotary embedding for the one query row needed, so every layer itself runs with sdpa or
flash attention. Schedules are reachable by name (:func:`create_schedule`), from YAML, or from a mapping with
``name`` (:func:`resolve_schedule`).

Example:
    >>> create_schedule("pdrop", layers=[8, 16, 24], keep=0.5).describe()
    'pdrop(layers=[8, 16, 24], keep=0.5)'
    >>> [(s.observe, s.layer) for s in create_schedule("fastv", layer=2, keep=0.25).stages]
    [(1, 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyrtok.vlm.schedules import dart, fastv, pdrop  # noqa: F401  (registration)
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage
from pyrtok.vlm.schedules.dart import DART, duplication_keep
from pyrtok.vlm.schedules.fastv import FastV
from pyrtok.vlm.schedules.pdrop import PyramidDrop

__all__ = ["DART", "SCHEDULES", "FastV", "PyramidDrop", "Schedule", "Stage", "available_schedules", "create_schedule",
           "duplication_keep", "register_schedule", "resolve_schedule", "schedule_label"]


def register_schedule(name: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: make a schedule reachable as ``create_schedule(name, ...)``."""
    return SCHEDULES.register(name)


def available_schedules() -> list[str]:
    """Names of the registered schedules."""
    return SCHEDULES.available()


def create_schedule(name: str, **config: Any) -> Schedule:
    """Build the schedule registered as ``name`` with keyword ``config``.

    Example:
        >>> create_schedule("dart", layer=2, keep=0.25, pivots=8).describe()
        'dart(layer=2, keep=0.25, pivots=8, text_pivots=4)'
    """
    return SCHEDULES.create(name, **config)


def resolve_schedule(spec: Any, argument: str = "schedule") -> Schedule | None:
    """Every form of a schedule spec -> a :class:`Schedule` (None stays None: no in-LLM dropping).

    ``spec``: a registered name, a YAML path (a mapping with ``name``), a mapping with ``name`` (and an optional
    ``label``) and options, or a :class:`Schedule`.
    """
    return None if spec is None else SCHEDULES.resolve(spec, argument)


def schedule_label(spec: Any) -> str:
    """The label tables use for a schedule spec: its ``label`` if the mapping gives one, else its description
    (``"none"`` for no schedule)."""
    if isinstance(spec, Mapping) and spec.get("label"):
        return str(spec["label"])
    schedule = resolve_schedule(spec)
    return "none" if schedule is None else schedule.describe()
