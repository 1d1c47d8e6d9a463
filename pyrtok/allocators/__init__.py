"""Token allocators: a registry of policies that keep the best tokens under a budget.

    >>> from pyrtok import allocators
    >>> allocators.available()  # doctest: +NORMALIZE_WHITESPACE
    ['all', 'cdpruner', 'cls_attention', 'difficulty', 'divprune', 'energy_diversity', 'fastervlm', 'foveated',
     'laplacian', 'pool', 'query', 'random', 'saliency', 'visionzip', 'vscan']
"""

from pyrtok.allocators import (  # noqa: F401
    attention,
    baselines,
    cdpruner,
    difficulty,
    divprune,
    energy_diversity,
    fastervlm,
    foveated,
    laplacian,
    query,
    saliency,
    visionzip,
    vscan,
)
from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import ALLOCATORS, available, create, from_config, register, resolve, spec_label
from pyrtok.allocators.select import water_fill
from pyrtok.budget import budget_tokens, resolve_budget

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "Context",
    "available",
    "budget_tokens",
    "create",
    "from_config",
    "register",
    "resolve",
    "resolve_budget",
    "spec_label",
    "water_fill",
]
