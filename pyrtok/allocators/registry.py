"""The allocator registry (:data:`ALLOCATORS`, a :class:`pyrtok.registry.Registry`) and its functional forms.

A spec names an allocator in any of the forms users write: a registered name (``"laplacian"``), a YAML path
(``configs/allocators/laplacian.yaml``), a mapping with a ``name`` key and keyword options (and an optional
``label``), or an :class:`~pyrtok.allocators.base.Allocator` instance. :func:`resolve` turns every form into an
allocator and :func:`spec_label` gives the label tables and rows use for it; the VLM adapter, the ablation
config and runner and the lmms-eval plugin all go through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pyrtok.allocators.base import Allocator
from pyrtok.registry import Registry, is_yaml_path

__all__ = ["ALLOCATORS", "AllocatorSpec", "available", "create", "from_config", "is_yaml_path", "register", "resolve",
           "spec_label"]

AllocatorSpec = Any
"""A registered name, a YAML path (str or Path), a mapping with ``name``, or an ``Allocator``."""

ALLOCATORS: Registry[Allocator] = Registry("allocator", Allocator)


def register(name: str) -> Callable[[type[Allocator]], type[Allocator]]:
    """Class decorator: make an allocator reachable as ``create(name, ...)``."""
    return ALLOCATORS.register(name)


def available() -> list[str]:
    """Names of the registered allocators."""
    return ALLOCATORS.available()


def create(name: str, **config: Any) -> Allocator:
    """Build the allocator registered as ``name`` with keyword ``config``.

    Example:
        >>> create("saliency", level_weights=[1.0, 1.5, 2.0]).name
        'saliency'
    """
    return ALLOCATORS.create(name, **config)


def from_config(config: str | Path | Mapping[str, Any]) -> Allocator:
    """Build an allocator from a YAML file (or its parsed mapping) with a ``name`` key and keyword options.

    A ``label`` key, if present, names the allocator in tables and is not passed on.
    """
    if not (is_yaml_path(config) or isinstance(config, Mapping)):
        raise TypeError(f"an allocator config is a YAML path or a mapping, got {type(config).__name__}")
    return ALLOCATORS.resolve(config, "allocator config")


def resolve(spec: AllocatorSpec, argument: str = "allocator") -> Allocator:
    """An :class:`~pyrtok.allocators.base.Allocator` from any spec form (see the module docstring).

    ``argument`` names the spec in error messages (for example ``"allocators[2]"``).

    Example:
        >>> resolve("random").name, resolve({"name": "saliency", "label": "sal"}).name
        ('random', 'saliency')
    """
    return ALLOCATORS.resolve(spec, argument)


def spec_label(spec: AllocatorSpec, argument: str = "allocator") -> str:
    """The label tables and rows use for ``spec``: a mapping's ``label`` (else its ``name``), a YAML file's stem,
    a registered name as it is, an instance's registered name.

    Example:
        >>> spec_label("configs/allocators/laplacian_fine.yaml"), spec_label({"name": "random", "label": "r"})
        ('laplacian_fine', 'r')
    """
    return ALLOCATORS.label(spec, argument)
