"""Token allocators: a registry of policies that keep the best tokens under a budget.

    >>> from pyrtok import allocators
    >>> allocators.available()
    ['all', 'cls_attention', 'difficulty', 'foveated', 'laplacian', 'pool', 'query', 'random', 'saliency']
"""

from pyrtok.allocators import attention, baselines, difficulty, foveated, laplacian, query, saliency  # noqa: F401
from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.budget import budget_tokens, resolve_budget
from pyrtok.allocators.registry import available, create, from_config, register, resolve, spec_label
from pyrtok.allocators.select import water_fill

__all__ = [
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
