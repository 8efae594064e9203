"""Core lending on one CPU machine: the role that waits gives its threads to the role that works.

With the engine and the learner on one core each (one-step-off pipeline), whichever finishes
first would leave its core idle: the engine's generation usually ends seconds before the
learner's update, and the learner waits whenever the engines generate alone (the first step,
evals, the synchronous pipeline). The driver knows who is busy; it writes the number of extra
threads each role may use into a small file (in /dev/shm where it exists), and each worker reads
it between units of work (each transformer block of a learner's forward and backward, each
decode step of an engine) and resizes its thread pool. Only for one engine and one learner
sharing one machine's CPUs (`RLRun` decides).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

ROLES = ("engine", "learner")


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_loan(engine_threads: int, learner_threads: int, cores: int) -> tuple[int, int] | None:
    """Extra threads (for the engine, for the learner) while the other role waits, or None where
    nothing can be lent: a role on all cores (0 threads) already has them."""
    if engine_threads <= 0 or learner_threads <= 0:
        return None
    engine, learner = min(learner_threads, cores - engine_threads), min(engine_threads, cores - learner_threads)
    return (engine, learner) if engine > 0 or learner > 0 else None


class CoreLoan:
    """The driver's side: how many extra threads each role may use now."""

    def __init__(self, engine_extra: int, learner_extra: int, directory: str | None = None) -> None:
        """Make the loan file (in `directory`, default /dev/shm or the temp dir), lending the
        engines `engine_extra` threads while the learner waits and the learner `learner_extra`
        while the engines wait; at first the learner waits."""
        self.extra = {"engine": engine_extra, "learner": learner_extra}
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, name = tempfile.mkstemp(prefix="align-cores-", dir=directory or shm)
        os.close(fd)
        self.path = Path(name)
        self.state = {r: -1 for r in ROLES}  # what the file says (-1: not written yet)
        self.learner_waits()

    def learner_waits(self) -> None:
        """Only the engines work (generation before an update, evals): they get the learner's threads."""
        self.set(engine=self.extra["engine"], learner=0)

    def learner_works(self, engines_idle: bool) -> None:
        """The learner starts working; it gets the engines' threads if they have nothing to do."""
        self.set(engine=0, learner=self.extra["learner"] if engines_idle else 0)

    def set(self, engine: int | None = None, learner: int | None = None) -> None:
        """Lend `engine` extra threads to the engines and `learner` to the learners (None: unchanged)."""
        new = dict(self.state, **{k: v for k, v in (("engine", engine), ("learner", learner)) if v is not None})
        if new == self.state:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{new['engine']} {new['learner']}")
        os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        self.state = new

    def close(self) -> None:
        """Remove the loan file."""
        self.path.unlink(missing_ok=True)


class ThreadBudget:
    """A worker's side: its own threads plus what the driver lends its role now."""

    def __init__(self, own: int, path: str | None, role: str, apply: Callable[[int], None]) -> None:
        """`own`: the threads the worker was given; `path`: the driver's loan file (None: never
        lends); `apply(n)`: resizes the worker's thread pool to n."""
        if role not in ROLES:
            raise ValueError(f"core loan role {role!r} is not one of {ROLES}")
        self.own, self.path, self.index, self.apply = own, path, ROLES.index(role), apply
        self.current = own
        self.peak = own  # most threads used since the last `reset` (reported in metrics)

    def refresh(self) -> int:
        """Read the loan and resize the pool if it changed; returns the threads in force."""
        want = self.own
        if self.path is not None:
            try:
                want += max(0, int(Path(self.path).read_text().split()[self.index]))
            except (OSError, ValueError, IndexError):  # the driver is rewriting or has closed it
                pass
        if want != self.current:
            self.apply(want)
            self.current = want
        self.peak = max(self.peak, want)
        return want

    def reset(self) -> int:
        """Back to the worker's own threads (the end of a unit of work); returns the peak since the last reset."""
        if self.current != self.own:
            self.apply(self.own)
            self.current = self.own
        peak, self.peak = self.peak, self.own
        return peak


def watch_layers(model: Any, refresh: Callable[[], Any]) -> list:
    """Call `refresh` before each transformer block's forward and as its output's gradient
    arrives in backward (a micro-batch takes seconds, a block milliseconds); returns the hook
    handles. The blocks are the longest `nn.ModuleList` in `model`."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    blocks = max(lists, key=len)

    def on_grad(grad: Any) -> Any:
        refresh()
        return grad

    def before(module: Any, args: Any) -> None:  # returns nothing: the block's inputs stay as they are
        refresh()

    def after(module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(on_grad)

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(before))
        handles.append(block.register_forward_hook(after))
    return handles
