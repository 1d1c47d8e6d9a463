"""In-LLM token dropping: schedules that decide, at chosen decoder layers, which image tokens go on.

One module per method, each registered in :data:`SCHEDULES`; the loop that runs them is :mod:`pyrtok.vlm.decode`.

- ``fastv`` (FastV): one stage; the last prompt token's attention inside layer ``layer - 1`` (averaged over
  heads) ranks the image tokens; layers ``layer`` and later see the top ``keep``.
- ``pdrop`` (PyramidDrop, as its released code runs): a stage at each of ``layers``; at each, the last
  instruction token's attention in that layer ranks the image tokens still present, and that layer already runs
  on the top ``int(n0 * keep**s)`` of the ``n0`` that entered; after each drop positions are renumbered
  0 .. T'-1. Variant ``keep_positions`` (``rounding="per_stage", positions="keep"``): pyrtok's earlier rule.
- ``dart`` (DART, as its released code runs): before layer ``layer``, the image and text pivots with the
  largest L1 norm of layer ``layer - 1``'s keys each keep ``max_num_trunction // pivots`` image tokens least
  similar (cosine, on the final-norm'd input of layer ``layer``) to them; image pivots are kept, so 128 keeps
  132. Variant ``exact`` (``pivot_space="hidden", exact_budget=True``): pyrtok's earlier rule, pivots by the
  hidden states' L1 norm and exactly the budget.
- ``vscan`` (VScan's language-model stage, as released): one PyramidDrop-style stage at a middle layer keeping
  ``keep`` (a third) of the image tokens, positions renumbered; with the ``vscan`` allocator it is VScan.

FastV and DART keep positions; PyramidDrop and VScan renumber them (see :mod:`pyrtok.vlm.decode`). Each schedule says
how many image tokens each stage keeps (:meth:`Schedule.stage_counts`); stage counts, effective tokens and FLOPs
are always the counts the run actually kept. Scores that need attention or keys come from the layer's own norm,
q/k projections (and q/k norms) and rotary embedding for the rows needed, so every layer itself runs with sdpa
or flash attention. Schedules are reachable by name (:func:`create_schedule`), from YAML, or from a mapping with
``name`` (:func:`resolve_schedule`); a variant is its options (``Schedule.variants``).

Example:
    >>> create_schedule("pdrop", layers=[8, 16, 24], keep=0.5).describe()
    'pdrop(layers=[8, 16, 24], keep=0.5)'
    >>> [(s.observe, s.layer) for s in create_schedule("fastv", layer=2, keep=0.25).stages]
    [(1, 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyrtok.vlm.schedules import dart, fastv, pdrop, vscan  # noqa: F401  (registration)
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage
from pyrtok.vlm.schedules.dart import DART, duplication_keep, pivot_duplication_keep
from pyrtok.vlm.schedules.fastv import FastV
from pyrtok.vlm.schedules.matched import MatchedSchedule, layer_tokens, matched_keep, schedule_prefill_flops
from pyrtok.vlm.schedules.pdrop import PyramidDrop
from pyrtok.vlm.schedules.vscan import VScan

__all__ = ["DART", "SCHEDULES", "FastV", "MatchedSchedule", "PyramidDrop", "Schedule", "Stage", "VScan",
           "available_schedules", "create_schedule", "duplication_keep", "layer_tokens", "matched_keep",
           "pivot_duplication_keep", "register_schedule", "resolve_schedule", "schedule_label",
           "schedule_prefill_flops", "schedule_variants"]


def register_schedule(name: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: make a schedule reachable as ``create_schedule(name, ...)``."""
    return SCHEDULES.register(name)


def available_schedules() -> list[str]:
    """Names of the registered schedules."""
    return SCHEDULES.available()


def schedule_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registered schedule and its named variants: ``"name"`` or ``"name:variant"`` -> (name, options).

    Example:
        >>> sorted(schedule_variants())
        ['dart', 'dart:exact', 'dart:qwen', 'fastv', 'pdrop', 'pdrop:keep_positions', 'vscan', 'vscan:qwen']
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in SCHEDULES.available():
        out[name] = (name, {})
        for variant, options in SCHEDULES.get(name).variants.items():
            out[f"{name}:{variant}"] = (name, dict(options))
    return out


def create_schedule(name: str, **config: Any) -> Schedule:
    """Build the schedule registered as ``name`` with keyword ``config``.

    Example:
        >>> create_schedule("dart", layer=2, keep=0.25, pivots=8).describe()
        'dart(layer=2, keep=0.25, pivots=8, text_pivots=4)'
        >>> create_schedule("dart", **SCHEDULES.get("dart").variants["exact"]).describe()
        "dart(layer=2, max_num_trunction=128, pivots=4, text_pivots=4, pivot_space='hidden', exact_budget=True)"
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
