"""OpenEnv environments (`openenv-core`, Meta's environment library) through align's protocol.

    env.name: openenv
    env.kwargs: {env: my_envs:WordleEnv, action: my_envs:GuessAction, action_field: guess,
                 observation_field: feedback}

An OpenEnv `Environment` runs in this process: `reset(**row)` -> Observation, `step(Action)` ->
Observation with `done` and `reward`. The adapter makes the model's reply the Action (its text in
`action_field`), and an Observation's `observation_field` the next user message; the first message
is that field of reset's Observation, or the row's prompt when it has none. Tool environments
(`MCPEnvironment`) are reached through their own `CallToolAction`s: a turn's Hermes tool calls are
sent to the environment (in this process, not in align's tool sandbox; leave `env.tools` empty so
no call runs twice), and their results come back as "tool" messages. The prompt (the row or the
reset Observation) must describe those tools. Environments served over
HTTP (OpenEnv's `EnvClient`) are not adapted: they need their server running.
"""
from __future__ import annotations

import importlib
from typing import Any

from align.envs import EnvStep, Turn, register_env


def _load(spec: str | type) -> type:
    if not isinstance(spec, str):
        return spec
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@register_env("openenv")
class OpenEnvAdapter:
    """One OpenEnv environment instance per episode, driven turn by turn."""

    def __init__(self, env: str | type, action: str | type | None = None, action_field: str = "text",
                 observation_field: str | None = None, env_kwargs: dict[str, Any] | None = None) -> None:
        """`env` / `action`: the Environment and Action classes ("module:Class"); `action_field`: the
        Action's field that holds the model's reply; `observation_field`: the Observation's field
        shown to the model (None: only done / reward are read)."""
        self.env = _load(env)(**(env_kwargs or {}))
        self.action = _load(action) if action is not None else None
        self.action_field = action_field
        self.observation_field = observation_field

    def _text(self, obs: Any) -> str | None:
        value = None if self.observation_field is None else getattr(obs, self.observation_field, None)
        return None if value is None else str(value)

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """reset(**row's columns); the Observation's text as the user message, else the row's prompt."""
        obs = self.env.reset(**{k: v for k, v in row.items() if k != "prompt"})
        text = self._text(obs)
        return [{"role": "user", "content": text}] if text else list(row["prompt"])

    def step(self, turn: Turn) -> EnvStep:
        """Tool calls -> CallToolActions (results as "tool" messages); else the reply as the Action."""
        if turn.tool_calls:
            from openenv.core.env_server.mcp_types import CallToolAction

            messages, reward, done = [], None, False
            for call in turn.tool_calls:
                if call.error:  # unreadable: answered here, as the tool runner answers it
                    messages.append({"role": "tool", "content": f"Error: {call.error}"})
                    continue
                obs = self.env.step(CallToolAction(tool_name=call.name, arguments=call.arguments))
                error = getattr(obs, "error", None)
                text = f"Error: {error.message}" if error else _result_text(getattr(obs, "result", None))
                messages.append({"role": "tool", "content": text})
                reward = obs.reward if obs.reward is not None else reward
                done = done or bool(obs.done)
            return EnvStep(messages, done, reward)
        if self.action is None:
            raise ValueError("openenv: a reply without a tool call needs env.kwargs.action (the Action class)")
        obs = self.env.step(self.action(**{self.action_field: turn.text}))
        text = self._text(obs)
        return EnvStep([] if obs.done or not text else [{"role": "user", "content": text}], bool(obs.done),
                       None if obs.reward is None else float(obs.reward))


def _result_text(result: Any) -> str:
    """An MCP tool result as text: its content parts' text, else its data."""
    parts = [getattr(c, "text", "") for c in getattr(result, "content", None) or []]
    return "".join(parts) if any(parts) else str(getattr(result, "data", result))
