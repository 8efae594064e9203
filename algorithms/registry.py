"""One dict from name to algorithm class, and a decorator that fills it (STYLE.md rule 3)."""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make `algorithms.get(name)` build this class."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def get(name: str, **kwargs: Any) -> Any:
    """Build the algorithm registered as `name` with hyper-parameters `kwargs`."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def names() -> list[str]:
    """Every registered algorithm name, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    """The class registered as `name` (for reading its fields and defaults)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
