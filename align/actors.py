"""A thin Ray layer (OpenRLHF's RayActorGroup, STYLE.md rule 9): place N copies of a worker class,
run a method on all of them, get the results where the driver can see it.

`debug=True` builds the same workers in this process instead (no Ray), so a run can be stepped
through with a debugger; `get` then returns the values computed eagerly. Ray is imported only
where an actor is made: the in-process path runs on machines without Ray.

Where actors go is decided by `align.placement` (a placement group and one slot per actor).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Done:
    """An eagerly computed result standing in for an ObjectRef in debug mode."""

    value: Any


def get(refs: Any) -> Any:
    """`ray.get` for object refs (or lists of them); the value itself for debug-mode results."""
    if isinstance(refs, list):
        if all(isinstance(r, Done) for r in refs):
            return [r.value for r in refs]
        import ray

        return ray.get(refs)
    if isinstance(refs, Done):
        return refs.value
    import ray

    return ray.get(refs)


# Logical CPUs of a local cluster at least: on one machine they count actors, not cores (every
# actor sets its own thread count), and later runs in the same process (tests, a notebook) reuse
# the first cluster, so a small first run must not leave a bigger later one without room.
LOCAL_MIN_CPUS = 8


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Start (or join, with RAY_ADDRESS / `address`) Ray; a local cluster binds to localhost only
    (it counts this machine's GPUs itself)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(num_cpus or os.cpu_count() or 1, LOCAL_MIN_CPUS), include_dashboard=False,
                 log_to_driver=True, _node_ip_address="127.0.0.1")


class ActorGroup:
    """N workers of one class, as Ray actors (or in-process objects in debug mode)."""

    def __init__(self, cls: type, n: int, *args: Any, num_cpus: float = 1, env_threads: int = 1,
                 debug: bool = False, max_restarts: int = 0, placement: tuple[Any, list] | None = None,
                 **kwargs: Any):
        """`max_restarts` > 0: Ray restarts a dead actor (re-running its constructor) and re-runs the
        call that was in flight; the caller must notice the fresh state (rollout workers report a
        weights version for that). `placement` = (placement group, one `align.placement.Slot` per
        actor) puts actor i on slot i with its CPUs and GPUs; without it each actor asks for
        `num_cpus` CPUs and no GPU."""
        self.debug = debug
        if debug:
            self.workers = [cls(*args, **kwargs) for _ in range(n)]
            return
        import ray

        from align.placement import scheduling

        # Each actor process gets its thread count from its environment before torch starts, and
        # PASSIVE OpenMP waiting so an idle actor does not spin on the cores the busy one needs.
        env = {"OMP_NUM_THREADS": str(env_threads), "OMP_WAIT_POLICY": "PASSIVE",
               "TOKENIZERS_PARALLELISM": "false"}
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ALIGN_CACHE", "WANDB_MODE"):
            if key in os.environ:
                env[key] = os.environ[key]
        opts: dict[str, Any] = dict(num_cpus=num_cpus, runtime_env={"env_vars": env})
        if max_restarts:
            opts.update(max_restarts=max_restarts, max_task_retries=max_restarts)
        remote = ray.remote(**opts)(cls)
        if placement is not None and len(placement[1]) < n:
            raise ValueError(f"{cls.__name__}: {n} actors but {len(placement[1])} placement slots")
        self.workers = [(remote.options(**scheduling(placement[0], placement[1][i])) if placement else remote)
                        .remote(*args, **kwargs) for i in range(n)]

    def __len__(self) -> int:
        return len(self.workers)

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method(*args, **kwargs)` on every worker; returns refs (debug: `Done` values)."""
        return [self.call(i, method, *args, **kwargs) for i in range(len(self.workers))]

    def run_each(self, method: str, args: list[tuple]) -> list[Any]:
        """Call `method(*args[i])` on worker i, for every worker; returns refs (debug: values)."""
        return [self.call(i, method, *a) for i, a in enumerate(args)]

    def call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `method` on worker `i` only; returns a ref (debug: a `Done` value)."""
        w = self.workers[i]
        if self.debug:
            return Done(getattr(w, method)(*args, **kwargs))
        return getattr(w, method).remote(*args, **kwargs)

    def kill(self) -> None:
        """Stop every actor (no-op in debug mode)."""
        if not self.debug:
            import ray

            for w in self.workers:
                ray.kill(w)
