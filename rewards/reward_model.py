"""A trained reward model's score as a reward function, optionally served by a Ray actor.

    >>> rm = rewards.get("reward_model", path="runs/rm/final")                 # in this process
    >>> rm = rewards.get("reward_model", path="runs/rm/final", ray_actor=True)  # one Ray actor
    >>> rm(prompts, completions)   # -> list[float], scored in batches of `batch_size`

The model code lives in `align.rm` (imported lazily: this package never imports align's core at
module level, see DESIGN.md "Who imports whom").
"""
from __future__ import annotations

from typing import Any

from rewards.registry import register


class _ActorScorer:
    """Forwards calls to a Ray actor holding the reward model (the actor scores whole batches)."""

    def __init__(self, path: str, batch_size: int, num_threads: int, num_cpus: float):
        import ray

        from align.rm import RewardModelScorer

        actor_cls = ray.remote(num_cpus=num_cpus)(RewardModelScorer)
        self.actor = actor_cls.remote(path, batch_size=batch_size, num_threads=num_threads)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        import ray

        return ray.get(self.actor.__call__.remote(prompts, completions))

    def close(self) -> None:
        """Stop the actor."""
        import ray

        ray.kill(self.actor)


@register("reward_model")
def reward_model(path: str, batch_size: int = 16, ray_actor: bool = False, num_threads: int = 1,
                 num_cpus: float = 1.0):
    """The score of the reward model saved at `path` (an `align rm` run's final/ directory)."""
    if ray_actor:
        return _ActorScorer(path, batch_size, num_threads, num_cpus)
    from align.rm import RewardModelScorer

    return RewardModelScorer(path, batch_size=batch_size, num_threads=num_threads)
