"""Tools a policy may call during an episode: plain Python functions with a JSON schema.

    from align.tools import Tool, get_tool
    def lookup(city: str) -> str:
        '''The population of a city.

        Args:
            city: the city's name
        '''
    tools = [Tool.from_function(lookup), get_tool("calculator")]

The schema comes from the function's type hints and Google-style docstring
(`transformers.utils.get_json_schema`, the function that chat templates' `tools=` argument uses).
How calls look in the model's text: the Hermes format that Qwen 2.5 / 3 and Hermes templates use,

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "23 * 47"}}
    </tool_call>

which `parse_tool_calls` reads ("parameters" is accepted for "arguments"). Formats without the tags
(Llama 3.1's bare JSON, Mistral's [TOOL_CALLS]) are not read: such models need the Hermes format taught.
A chat template that has a `tools` argument renders the schemas itself; for one without (SmolLM2's)
`tool_instructions` is the system text that offers them, in that same format.

Tools run in separate processes with a deadline and a memory limit (`align.sandbox`); the built-in
ones (`align.builtin_tools`) also run under a guard that refuses network, processes and files
outside a scratch directory.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from align import builtin_tools


@dataclass
class Tool:
    """A callable offered to the model, with the JSON schema the chat template renders."""

    name: str  # what the model writes in a call's "name"
    fn: Callable[..., Any]  # called with the call's arguments as keywords; its result becomes text
    schema: dict[str, Any]  # {"type": "function", "function": {name, description, parameters}}
    sandboxed: bool = False  # run under the no-network / scratch-directory-only guard (align.sandbox)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], sandboxed: bool = False) -> "Tool":
        """A tool from a function with type hints and a Google-style docstring (Args: section)."""
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
        schema["function"].pop("return", None)  # not part of the OpenAI tool format templates expect
        return cls(fn.__name__, fn, schema, sandboxed)


BUILTIN = {"calculator": builtin_tools.calculator, "python": builtin_tools.python}


def get_tool(spec: str) -> Tool:
    """A built-in tool by name ("calculator", "python") or any importable function, "module:function"."""
    if spec in BUILTIN:
        return Tool.from_function(BUILTIN[spec], sandboxed=True)
    if ":" not in spec:
        raise ValueError(f"unknown tool {spec!r}: use one of {', '.join(BUILTIN)} or 'module:function'")
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"tool {spec!r}: cannot import it ({exc})") from None
    return Tool.from_function(fn)


@dataclass
class ToolCall:
    """One call parsed from a model turn; `error` is set when the call could not be read."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # e.g. "invalid JSON": the call is answered with this, never run


_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The Hermes-format calls in `text`, in order; a call cut off at the token limit (no closing
    tag) is still read when its JSON is whole. Unreadable calls come back with `error` set."""
    calls = []
    for m in _CALL.finditer(text):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(ToolCall("", error=f"the tool call is not valid JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", error='a tool call must be {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], error="the arguments must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model should write it (demonstrations for SFT use this)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def template_has_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` argument itself (tried, not read)."""
    if not tokenizer.chat_template:
        return False
    msgs = [{"role": "user", "content": "x"}]
    probe = [{"type": "function", "function": {"name": "align_probe_tool", "description": "", "parameters":
                                               {"type": "object", "properties": {}}}}]
    try:
        return "align_probe_tool" in tokenizer.apply_chat_template(msgs, tools=probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot take tools does not render them
        return False


def tool_instructions(tools: list[Tool]) -> str:
    """System text offering `tools` in the Hermes format, for chat templates without `tools`."""
    schemas = "\n".join(json.dumps(t.schema) for t in tools)
    return ("You can call tools to help you. Their signatures, one JSON object per line:\n"
            f"<tools>\n{schemas}\n</tools>\n"
            "To call one, reply with only the call, written as\n"
            '<tool_call>\n{"name": <tool name>, "arguments": <JSON object of arguments>}\n</tool_call>\n'
            "Its result then comes back in a message from the tool. When you have the answer, "
            "reply without a tool call.")
