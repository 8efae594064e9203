"""One dict from name to algorithm class, and a decorator that fills it (STYLE.md rule 3).

`get` checks the name and the hyper-parameter names before it builds anything, so a typo in a
config (`clip_hihg`) stops with the closest valid spelling instead of a bare KeyError / TypeError.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable

_REGISTRY: dict[str, type] = {}


class AlgorithmConfigError(KeyError, ValueError):
    """An unknown algorithm name or hyper-parameter; the message names it and the closest valid one.

    A KeyError too, so that code written against the registry's earlier KeyError still catches it.
    """

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make `algorithms.get(name)` build this class."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def get(name: str, **kwargs: Any) -> Any:
    """Build the algorithm registered as `name` with hyper-parameters `kwargs`.

    Example:
        >>> get("grpo", clip_hihg=0.28)
        Traceback (most recent call last):
        ...
        algorithms.registry.AlgorithmConfigError: unknown parameter 'clip_hihg' for algorithm 'grpo'; did you mean 'clip_high'? (valid: ...)
    """
    cls = get_class(name)
    valid = params(cls)
    for key in kwargs:
        if key not in valid:
            raise AlgorithmConfigError(f"unknown parameter {key!r} for algorithm {name!r}"
                                       f"{_did_you_mean(key, valid)} (valid: {', '.join(valid)})")
    return cls(**kwargs)


def params(cls: type) -> list[str]:
    """The hyper-parameter names `cls` takes: its init fields (a dataclass) or constructor keywords."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(cls).parameters.items() if p.kind in kinds]


def names() -> list[str]:
    """Every registered algorithm name, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    """The class registered as `name` (for reading its fields and defaults)."""
    if name not in _REGISTRY:
        raise AlgorithmConfigError(f"unknown algorithm {name!r}{_did_you_mean(name, names())} "
                                   f"(valid names: {', '.join(names())})")
    return _REGISTRY[name]


def _did_you_mean(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""
