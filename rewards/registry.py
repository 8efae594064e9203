"""The reward registry: one dict from a name to a factory, and a loader for user functions.

A reward function is a plain callable
`fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, where each column
is a list aligned with `prompts` (e.g. `answer=[...]`) and None means "cannot be scored".
A registry entry is a *factory*: `get("format", tags=("answer",))` calls it with the keyword
arguments and returns the reward function (verl's `register_policy_loss` pattern, STYLE.md 3).

Names and keyword arguments are checked before the factory runs, so a typo in a config stops with
the name and its closest valid spelling instead of a bare KeyError / TypeError. A string holding
`${env:NAME}` in any keyword argument is replaced by that environment variable when the function
is built (how API keys and `Authorization` headers reach a reward without entering a config file).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable, Protocol

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")  # "${env:NAME}" in a keyword argument


class RewardConfigError(KeyError, ValueError):
    """An unknown reward name or keyword argument, or an unset `${env:NAME}`; the message names it.

    A KeyError too, so that code written against the registry's earlier KeyError still catches it.
    """

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


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
        >>> get("fromat")
        Traceback (most recent call last):
        ...
        rewards.registry.RewardConfigError: unknown reward 'fromat'; did you mean 'format'? ...
    """
    factory, kwargs = _checked(name, kwargs)
    return factory(**kwargs)


def check(name: str, **kwargs: Any) -> None:
    """Raise what `get(name, **kwargs)` would for an unknown name or argument or an unset
    `${env:NAME}`, without building anything (cheap: for validating a config before a run starts)."""
    _checked(name, kwargs)


def _checked(name: str, kwargs: dict[str, Any]) -> tuple[Callable[..., RewardFn], dict[str, Any]]:
    """(the factory to call, the kwargs with `${env:...}` resolved), both checked."""
    kwargs = resolve_env(kwargs, f"reward {name!r}")
    if ":" in name and name not in _REGISTRY:
        obj = load_function(name)
        if not kwargs:  # a user spec without kwargs names the reward function itself
            return (lambda: obj), kwargs
        check_kwargs(obj, kwargs, f"reward factory {name!r}")
        return obj, kwargs
    if name not in _REGISTRY:
        raise RewardConfigError(f"unknown reward {name!r}{_did_you_mean(name, names())} (registered: "
                                f"{', '.join(names())}; or give 'module:function' / 'path/to/file.py:function')")
    check_kwargs(_REGISTRY[name], kwargs, f"reward {name!r}")
    return _REGISTRY[name], kwargs


def _did_you_mean(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Raise RewardConfigError naming an unknown or missing keyword argument of `factory`.

    A factory that takes `**kwargs` accepts any name, so only its missing required ones are named.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: let the call speak
        return
    keyword = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in keyword and not takes_any:
            raise RewardConfigError(f"unknown argument {key!r} for {what}{_did_you_mean(key, keyword)} "
                                    f"(valid: {', '.join(keyword) or 'none'})")
    missing = [n for n in keyword if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise RewardConfigError(f"{what} needs argument(s) {', '.join(map(repr, missing))} "
                                f"(valid: {', '.join(keyword)})")


def resolve_env(value: Any, what: str = "reward") -> Any:
    """`value` with every `${env:NAME}` in its strings replaced by os.environ['NAME'] (nested dicts
    and lists too); an unset variable is a RewardConfigError naming it. The input is not changed."""
    if isinstance(value, dict):
        return {k: resolve_env(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_env(v, what) for v in value)
    if not isinstance(value, str) or "${env:" not in value:
        return value

    def lookup(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise RewardConfigError(f"{what}: environment variable {match.group(1)} is not set "
                                    f"(referenced as '{match.group(0)}')")
        return os.environ[match.group(1)]

    return ENV_REF.sub(lookup, value)


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
