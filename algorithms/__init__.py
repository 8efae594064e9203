"""Algorithm objects: hyper-parameters as dataclass fields; `select`, `advantages`, `loss` over shared batches.

`algorithms.get("grpo", clip_low=0.2, ...)` builds one; an unknown name lists the valid ones.
"""
from algorithms.registry import get, get_class, names, register
from algorithms.core import aggregate

# Importing the modules registers their classes.
from algorithms import grpo, ppo, baselines, preference  # noqa: E402,F401

__all__ = ["get", "get_class", "names", "register", "aggregate"]
