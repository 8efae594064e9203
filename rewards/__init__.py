"""Reward functions and the runner that combines them.

A reward function is a plain callable
`fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`; each column is
a list aligned with the prompts (the dataset row's other fields, e.g. `answer=[...]`), and None
means the completion cannot be scored (it is left out of the group statistics).

    >>> import rewards
    >>> rewards.names()
    ['format', 'math_accuracy', 'number_match', 'remote', 'reward_model', 'soft_overlong']
    >>> acc = rewards.get("math_accuracy", timeout=5.0)
    >>> mine = rewards.get("my_rewards.py:brevity")            # a user function, by file or module
    >>> judge = rewards.get("remote", url=URL, headers={"Authorization": "Bearer ${env:JUDGE_TOKEN}"})
    >>> with rewards.RewardRunner([rewards.RewardSpec("math", acc, weight=1.0, timeout=300.0),
    ...                            rewards.RewardSpec("brevity", mine, weight=0.1)]) as run:
    ...     result = run(prompts, completions, {"answer": golds})

Built-ins: `math_accuracy` (math-verify in a process pool with hard timeouts), `format` (tags,
regex, or "ends with a number"), `soft_overlong` (DAPO's length penalty from token counts), `remote`
(an HTTP scorer), `reward_model` (a trained reward model, in-process or as a Ray actor). This package imports nothing from `algorithms/` or `rollout/`.
"""
from rewards.registry import RewardConfigError, RewardFn, check, get, load_function, names, register

# Importing the built-in modules registers them.
from rewards.format import FormatReward  # noqa: E402
from rewards.length import SoftOverlong  # noqa: E402
from rewards.math_accuracy import MathAccuracy, normalize_gold  # noqa: E402
from rewards.math_pool import MathVerifyPool  # noqa: E402
from rewards import number_match as _number_match  # noqa: E402,F401
from rewards.remote import RemoteReward, RemoteRewardError  # noqa: E402
from rewards import reward_model as _reward_model  # noqa: E402,F401
from rewards.runner import RewardError, RewardResult, RewardRunner, RewardSpec  # noqa: E402

__all__ = [
    "RewardConfigError", "RewardFn", "check", "get", "load_function", "names", "register",
    "FormatReward", "SoftOverlong", "MathAccuracy", "normalize_gold", "MathVerifyPool",
    "RemoteReward", "RemoteRewardError", "RewardError", "RewardResult", "RewardRunner", "RewardSpec",
]
