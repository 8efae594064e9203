"""Environments for multi-turn episodes: as small as Gymnasium's, in chat messages.

An environment is made once per episode and driven by `align.episodes.EpisodeRunner`:

    messages = env.reset(row)          # the first messages (system / user) of the conversation
    result = env.step(turn)            # after every model turn: EnvStep(messages, done, reward)

`row` is the dataset row's columns plus "prompt", the chat messages that `data.prompt_field` (and
`data.prompt_suffix`) give. `reset` must be a function of the row: a GRPO group's samples share
their first prompt. `turn` is the model's reply (`Turn`): its text, its tool calls as parsed and
their results, already run in the tool sandbox (`env.tools`), so a tool environment never runs
model-written code itself (the OpenEnv adapter is the exception: its environments own their tools). `EnvStep.messages` (tool results, feedback, a next question) are appended to the
conversation as environment tokens, never trained on; `reward` (any turn, summed) adds to the run's
reward functions, which score the last model turn with the row's columns as in one-turn RL (an
environment reward makes a sample scored even where every reward function returned None).

    class Guess:                                   # a user-written environment: "module:Guess"
        def reset(self, row): self.secret = row["answer"]; return row["prompt"]
        def step(self, turn):
            if turn.text.strip() == str(self.secret): return EnvStep(done=True, reward=1.0)
            return EnvStep([{"role": "user", "content": "Wrong, try again."}])
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from align.sandbox import ToolResult
from align.tools import ToolCall


@dataclass
class Turn:
    """One model turn, as the environment sees it."""

    text: str  # the decoded reply (stop strings cut, special tokens dropped)
    finish_reason: str  # "stop" (EOS / stop string) or "length" (the turn's token limit)
    tool_calls: list[ToolCall] = field(default_factory=list)  # parsed from `text`, in order
    tool_results: list[ToolResult] = field(default_factory=list)  # one per call, already run (empty: not run here)


@dataclass
class EnvStep:
    """The environment's answer to a turn."""

    messages: list[dict[str, str]] = field(default_factory=list)  # appended as environment tokens
    done: bool = False  # the episode ended (no more model turns)
    reward: float | None = None  # added to the episode's reward (summed over turns)


@runtime_checkable
class Environment(Protocol):
    """What `EpisodeRunner` drives: the first messages, then an answer per model turn."""

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The conversation's first messages for this data row."""
        ...

    def step(self, turn: Turn) -> EnvStep:
        """New messages (or done) and an optional reward, after the model's `turn`."""
        ...


class ToolEnv:
    """The default environment: the row's prompt, each tool call answered with its result (role
    "tool"), done at the first reply without a tool call. Rewards come from the run's reward
    functions on that final reply."""

    def __init__(self, system: str | None = None) -> None:
        """`system`: a system message put first (the tool instructions are added to it where needed)."""
        self.system = system

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The row's prompt messages, after the system message when one is configured."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(row["prompt"])

    def step(self, turn: Turn) -> EnvStep:
        """Tool results as "tool" messages; done when the turn called no tool (or the run has none)."""
        if not turn.tool_results:
            return EnvStep(done=True)
        return EnvStep([{"role": "tool", "content": r.text} for r in turn.tool_results])


ENVS: dict[str, type] = {"tools": ToolEnv}


def register_env(name: str) -> Callable[[type], type]:
    """Class decorator: `env.name=<name>` then makes this environment."""
    def deco(cls: type) -> type:
        ENVS[name] = cls
        return cls
    return deco


def env_factory(name: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Environment]:
    """A function making a fresh environment per episode: a registered name or "module:Class"."""
    kwargs = dict(kwargs or {})
    if name == "openenv":
        from align import openenv_adapter  # noqa: F401 - registers it (its library is imported only when used)
    if name in ENVS:
        cls = ENVS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"env.name {name!r}: cannot import it ({exc})") from None
    else:
        raise ValueError(f"unknown environment {name!r}: use one of {', '.join(ENVS)} or 'module:Class'")
    make = lambda: cls(**kwargs)  # noqa: E731
    env = make()  # a wrong kwarg or a class that is no environment stops here, before any model loads
    if not isinstance(env, Environment):
        raise TypeError(f"env.name {name!r}: {cls.__name__} has no reset(row) and step(turn)")
    return make
