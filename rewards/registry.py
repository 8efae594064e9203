"""The reward registry: one dict from a name to a factory, and a loader for user functions.

A reward function is a plain callable
`fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, where each column
is a list aligned with `prompts` (e.g. `answer=[...]`) and None means "cannot be scored".
A registry entry is a *factory*: `get("format", tags=("answer",))` calls it with the keyword
arguments and returns the reward function (verl's `register_policy_loss` pattern, STYLE.md 3).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Protocol


class RewardFn(Protocol):
    """What every reward function looks like."""

    def __call__(self, prompts: list[str], completions: list[str],
                 **columns: list[Any]) -> list[float | None]: ...


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator: register a factory (keyword arguments -> reward function) under `name`.

    Example:
        >>> @register("length_bonus")
        ... def length_bonus(scale: float = 0.01):
        ...     return lambda prompts, completions, **cols: [scale * len(c) for c in completions]
        >>> get("length_bonus", scale=0.5)(["p"], ["abcd"])
        [2.0]
    """
    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


def names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> RewardFn:
    """The reward function `name` built with `kwargs`, or a user function from a spec.

    `name` is a registered name (see `names()`), or a spec `"package.module:function"` or
    `"path/to/file.py:function"`. A spec names the reward function itself; when `kwargs` are given
    it names a factory instead, called as `function(**kwargs)` to build the reward function.

    Example:
        >>> fn = get("format", ends_with_number=True)
        >>> fn(["2+2?"], ["It is 4"])
        [1.0]
        >>> get("nope")
        Traceback (most recent call last):
        ...
        KeyError: "unknown reward 'nope'; registered: ..."
    """
    if ":" in name and name not in _REGISTRY:
        obj = load_function(name)
        return obj(**kwargs) if kwargs else obj
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(names())} "
                       "(or give 'module:function' / 'path/to/file.py:function')") from None
    return factory(**kwargs)


def load_function(spec: str) -> Callable[..., Any]:
    """Import `"module:attr"` or `"path/to/file.py:attr"` and return the attribute.

    A file path is recognised by a '.py' suffix or a path separator; the file is loaded as a module
    named after its absolute path, so two files called `rewards.py` do not collide.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function' or "
                         "'path/to/file.py:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward spec {spec!r}: no file {path}")
        mod_name = "align_user_reward_" + "".join(c if c.isalnum() else "_" for c in path)
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module  # before exec, so dataclasses/pickle can find it
            try:
                file_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        module = importlib.import_module(target)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"reward spec {spec!r}: {module.__name__} has no attribute "
                                 f"{attr!r}") from None
    if not callable(obj):
        raise TypeError(f"reward spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj
