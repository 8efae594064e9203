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

    def __init__(self, path: str, batch_size: int, num_threads: int, num_cpus: float, device: str,
                 actor_options: dict[str, Any] | None):
        import ray

        from align.rm import RewardModelScorer

        # actor_options: the CPUs / GPUs and placement-group slot the RL run planned for it
        actor_cls = ray.remote(num_cpus=num_cpus)(RewardModelScorer)
        if actor_options:
            actor_cls = actor_cls.options(**actor_options)
        self.actor = actor_cls.remote(path, batch_size=batch_size, num_threads=num_threads, device=device)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        import ray

        return ray.get(self.actor.__call__.remote(prompts, completions))

    def close(self) -> None:
        """Stop the actor."""
        import ray

        ray.kill(self.actor)


@register("reward_model")
def reward_model(path: str, batch_size: int = 16, ray_actor: bool = False, num_threads: int = 1,
                 num_cpus: float = 1.0, device: str = "auto", actor_options: dict[str, Any] | None = None):
    """The score of the reward model saved at `path` (an `align rm` run's final/ directory), on
    `device` (auto: the GPU of the process where there is one); `actor_options` are Ray options
    for the actor (the RL run passes its placement-group slot)."""
    if ray_actor:
        return _ActorScorer(path, batch_size, num_threads, num_cpus, device, actor_options)
    from align.rm import RewardModelScorer

    return RewardModelScorer(path, batch_size=batch_size, num_threads=num_threads, device=device)
