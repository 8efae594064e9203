"""Environments for the multi-turn tests (loaded by "module:Class", as users load theirs)."""
from align.envs import EnvStep


class Scripted:
    """Three model turns: a tool result after the first, user feedback after the second, done after
    the third; a reward of 0.5 on the last turn."""

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        self.turns = getattr(self, "turns", 0) + 1
        if self.turns == 1:
            return EnvStep([{"role": "tool", "content": "19"}])
        if self.turns == 2:
            return EnvStep([{"role": "user", "content": "good"}])
        return EnvStep(done=True, reward=0.5)


class Endless:
    """Never done: every turn gets the same feedback (the turn limit must end it)."""

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        return EnvStep([{"role": "user", "content": "again"}])


class TwoTurns:
    """A second turn after "Say more."; the run's reward functions score that second turn."""

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        self.turns = getattr(self, "turns", 0) + 1
        return EnvStep(done=True) if self.turns == 2 else EnvStep([{"role": "user", "content": "Say more."}])
