"""One registry for every pluggable policy: allocators, in-LLM schedules and model families.

A :class:`Registry` maps names to classes and resolves every form of a spec that users write in one place:
a registered name (``"laplacian"``), a YAML path (``configs/allocators/laplacian.yaml``, a mapping with
``name``), a mapping with a ``name`` key, keyword options and an optional ``label``, or an instance. Unknown
names and misspelled options get one-line errors that list what is valid and suggest the closest match.

Example:
    >>> from pyrtok.allocators import ALLOCATORS
    >>> ALLOCATORS.resolve({"name": "saliency", "label": "sal"}).name, ALLOCATORS.label("configs/x/pool_fine.yaml")
    ('saliency', 'pool_fine')
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

__all__ = ["Registry", "is_yaml_path", "load_spec_file", "suggest"]

T = TypeVar("T")


def is_yaml_path(spec: Any) -> bool:
    """Whether ``spec`` names a YAML file (a Path, or a str ending in .yaml / .yml)."""
    return isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml")))


def load_spec_file(path: str | Path, argument: str) -> Any:
    """The parsed YAML of a spec file; a missing file is a FileNotFoundError naming ``argument``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: file {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def suggest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Names -> classes of one kind (``kind`` names it in errors: "allocator", "schedule", ...).

    Args:
        kind: what the registry holds, for messages.
        base: the common base class; instances of it resolve to themselves.
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make ``cls`` reachable as ``create(name, ...)`` (and set ``cls.name``)."""

        def wrap(cls: type[T]) -> type[T]:
            self.add(name, cls)
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return wrap

    def add(self, name: str, cls: type[T]) -> None:
        """Register ``cls`` under ``name``; a name is registered once."""
        if name in self._classes:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._classes[name].__name__})")
        self._classes[name] = cls

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def get(self, name: str) -> type[T] | None:
        return self._classes.get(name)

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def options(self, name: str) -> list[str]:
        """The keyword options the class registered as ``name`` takes (its constructor's, bases' included)."""
        found: list[str] = []
        for cls in self._classes[name].__mro__:
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            for parameter in inspect.signature(init).parameters.values():
                if parameter.name != "self" and parameter.kind in (parameter.KEYWORD_ONLY,
                                                                   parameter.POSITIONAL_OR_KEYWORD):
                    found.append(parameter.name)
        return sorted(set(found))

    def create(self, name: str, argument: str | None = None, **options: Any) -> T:
        """Build the class registered as ``name`` with keyword ``options``.

        Raises:
            ValueError: ``name`` is not registered (the message lists the names, with the closest one).
            TypeError: an option the class does not take (the message lists the ones it does).
        """
        where = f"{argument}: " if argument else ""
        if name not in self._classes:
            raise ValueError(f"{where}unknown {self.kind} {name!r}{suggest(str(name), self.available())}; "
                             f"available: {self.available()}")
        valid = self.options(name)
        unknown = [key for key in options if key not in valid]
        if unknown:
            hints = "".join(suggest(key, valid) for key in unknown)
            raise TypeError(f"{where}{self.kind} {name!r} has no option {', '.join(map(repr, unknown))}{hints}; "
                            f"its options: {valid}")
        return self._classes[name](**options)

    def resolve(self, spec: Any, argument: str | None = None) -> T:
        """An instance from any spec form (see the module docstring). ``argument`` names it in errors."""
        argument = argument or self.kind
        if isinstance(spec, self.base):
            return spec
        if is_yaml_path(spec):
            spec = load_spec_file(spec, argument)
        if isinstance(spec, Mapping):
            options = {k: v for k, v in spec.items() if k != "label"}
            if "name" not in options:
                raise ValueError(f"{argument} must be a mapping with a 'name' key, got {dict(spec)!r}")
            return self.create(options.pop("name"), argument, **options)
        if isinstance(spec, str):
            if spec not in self._classes:
                raise ValueError(f"{argument} must be a registered {self.kind} {self.available()} or a YAML path, "
                                 f"got {spec!r}{suggest(spec, self.available())}")
            return self.create(spec, argument)
        article = "an" if self.base.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{argument} must be {article} {self.base.__name__}, a registered name {self.available()}, "
                        f"a YAML path or a mapping with 'name', got {type(spec).__name__}")

    def label(self, spec: Any, argument: str | None = None) -> str:
        """The label tables and rows use for ``spec``: a mapping's ``label`` (else its ``name``), a YAML file's
        stem, a registered name as it is, an instance's registered name."""
        if isinstance(spec, self.base):
            return str(getattr(spec, "name", type(spec).__name__))
        if is_yaml_path(spec):
            return Path(spec).stem
        if isinstance(spec, str):
            return spec
        if isinstance(spec, Mapping) and isinstance(spec.get("label", spec.get("name")), str):
            return spec.get("label", spec["name"])
        raise ValueError(f"{argument or self.kind} must be a registered name, a YAML path or a mapping with 'name', "
                         f"got {spec!r}")
