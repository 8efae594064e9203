"""Algorithm objects: hyper-parameters as dataclass fields; `select`, `advantages`, `loss` over shared batches.

`algorithms.get("grpo", clip_low=0.2, ...)` builds one; an unknown name or hyper-parameter is an
`AlgorithmConfigError` naming the closest valid one.
"""
from algorithms.registry import AlgorithmConfigError, get, get_class, names, params, register
from algorithms.core import aggregate

# Importing the modules registers their classes.
from algorithms import grpo, ppo, baselines, preference  # noqa: E402,F401

__all__ = ["AlgorithmConfigError", "get", "get_class", "names", "params", "register", "aggregate"]
