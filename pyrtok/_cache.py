"""A cache for functions that build constant tensors (filters, kernels, index tables).

``functools.lru_cache`` alone keeps whatever the first call built: a tensor first built inside
``torch.inference_mode()`` is an inference tensor, and every later call that autograd records then fails
("Inference tensors cannot be saved for backward"). :func:`tensor_cache` builds with inference mode off, so the
cached tensors are ordinary ones wherever they are first asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["tensor_cache"]

T = TypeVar("T")


def tensor_cache(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``functools.lru_cache(maxsize)`` whose misses run with inference mode off (arguments must be hashable;
    as with ``lru_cache``, a call by keyword and the same call by position are separate entries).

    Example:
        >>> @tensor_cache(maxsize=4)
        ... def ramp(n: int) -> torch.Tensor:
        ...     return torch.arange(n, dtype=torch.float32)
        >>> with torch.inference_mode():
        ...     first = ramp(3)
        >>> first.is_inference()
        False
    """

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args: object, **kwargs: object) -> T:
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        return cached

    return decorate
