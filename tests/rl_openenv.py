"""An OpenEnv environment for the adapter test: an MCP `add` tool, then a text answer (done, reward)."""
from fastmcp import FastMCP
from openenv.core.env_server.mcp_environment import MCPEnvironment
from openenv.core.env_server.types import Action, Observation, State


class TextObservation(Observation):
    """The question."""

    prompt: str = ""


class AnswerAction(Action):
    """The model's reply."""

    text: str


class AddEnv(MCPEnvironment):
    """Asks for a + b; reward 1 when the answer ends with the sum."""

    def __init__(self):
        mcp = FastMCP("add-env")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        super().__init__(mcp)
        self._state, self._target = State(step_count=0), None

    def reset(self, seed=None, episode_id=None, **row):
        self._state = State(episode_id=episode_id, step_count=0)
        self._target = row["a"] + row["b"]
        return TextObservation(prompt=f"What is {row['a']} + {row['b']}? Use the add tool, then answer.")

    def _step_impl(self, action, timeout_s=None, **kw):
        return Observation(done=True, reward=float(action.text.strip().endswith(str(self._target))))

    @property
    def state(self):
        return self._state
