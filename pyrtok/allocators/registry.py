"""The allocator registry, and the one resolver of allocator specs.

A spec names an allocator in any of the forms users write: a registered name (``"laplacian"``), a YAML path
(``configs/allocators/laplacian.yaml``), a mapping with a ``name`` key and keyword options (and an optional
``label``), or an :class:`~pyrtok.allocators.base.Allocator` instance. :func:`resolve` turns every form into an
allocator and :func:`spec_label` gives the label tables and rows use for it; the VLM adapter, the ablation
config and runner and the lmms-eval plugin all go through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pyrtok.allocators.base import Allocator

__all__ = ["AllocatorSpec", "available", "create", "from_config", "is_yaml_path", "register", "resolve", "spec_label"]

AllocatorSpec = Any
"""A registered name, a YAML path (str or Path), a mapping with ``name``, or an ``Allocator``."""

_REGISTRY: dict[str, type[Allocator]] = {}


def register(name: str) -> Callable[[type[Allocator]], type[Allocator]]:
    """Class decorator: make an allocator reachable as ``create(name, ...)``."""

    def wrap(cls: type[Allocator]) -> type[Allocator]:
        if name in _REGISTRY:
            raise ValueError(f"an allocator named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of the registered allocators."""
    return sorted(_REGISTRY)


def create(name: str, **config: Any) -> Allocator:
    """Build the allocator registered as ``name`` with keyword ``config``.

    Example:
        >>> create("saliency", level_weights=[1.0, 1.5, 2.0]).name
        'saliency'
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown allocator {name!r}; available: {available()}")
    return _REGISTRY[name](**config)


def is_yaml_path(spec: Any) -> bool:
    """Whether ``spec`` names a YAML file (a Path, or a str ending in .yaml / .yml)."""
    return isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml")))


def from_config(config: str | Path | Mapping[str, Any]) -> Allocator:
    """Build an allocator from a YAML file (or its parsed mapping) with a ``name`` key and keyword options.

    A ``label`` key, if present, names the allocator in tables and is not passed on.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"allocator config {str(path)!r} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"an allocator config must be a mapping with a 'name' key, got {config!r}")
    options = {k: v for k, v in config.items() if k != "label"}
    return create(options.pop("name"), **options)


def resolve(spec: AllocatorSpec, argument: str = "allocator") -> Allocator:
    """An :class:`~pyrtok.allocators.base.Allocator` from any spec form (see the module docstring).

    ``argument`` names the spec in error messages (for example ``"allocators[2]"``).

    Example:
        >>> resolve("random").name, resolve({"name": "saliency", "label": "sal"}).name
        ('random', 'saliency')
    """
    from pyrtok.allocators.base import Allocator

    if isinstance(spec, Allocator):
        return spec
    if is_yaml_path(spec) or isinstance(spec, Mapping):
        return from_config(spec)
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(f"{argument} must be a registered allocator {available()} or an allocator YAML path, "
                             f"got {spec!r}")
        return create(spec)
    raise TypeError(f"{argument} must be an Allocator, a registered name, a YAML path or a mapping with 'name', "
                    f"got {type(spec).__name__}")


def spec_label(spec: AllocatorSpec, argument: str = "allocator") -> str:
    """The label tables and rows use for ``spec``: a mapping's ``label`` (else its ``name``), a YAML file's stem,
    a registered name as it is, an instance's registered name.

    Example:
        >>> spec_label("configs/allocators/laplacian_fine.yaml"), spec_label({"name": "random", "label": "r"})
        ('laplacian_fine', 'r')
    """
    from pyrtok.allocators.base import Allocator

    if isinstance(spec, Allocator):
        return spec.name
    if is_yaml_path(spec):
        return Path(spec).stem
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping) and isinstance(spec.get("label", spec.get("name")), str):
        return spec.get("label", spec["name"])
    raise ValueError(f"{argument} must be a registered name, a YAML path or a mapping with 'name', got {spec!r}")
