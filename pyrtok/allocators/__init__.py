"""Token allocators: a registry of policies that keep the best tokens under a budget.

    >>> from pyrtok import allocators
    >>> allocators.available()
    ['all', 'cls_attention', 'difficulty', 'foveated', 'laplacian', 'pool', 'query', 'random', 'saliency']
"""

from pyrtok.allocators import attention, baselines, difficulty, foveated, laplacian, query, saliency  # noqa: F401
from pyrtok.allocators.base import (
    Allocator,
    available,
    create,
    from_config,
    register,
    resolve_budget,
    water_fill,
)

__all__ = ["Allocator", "available", "create", "from_config", "register", "resolve_budget", "water_fill"]
