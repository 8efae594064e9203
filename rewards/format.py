"""Format rewards: does the completion have the required shape? No answer checking here.

Default: the R1-style `<think>...</think><answer>...</answer>` layout (each tag exactly once, in
that order, nothing but whitespace outside them), the check open-r1's `format_reward` makes with a
regex. Alternatives through constructor arguments: a custom regex, other tags, "ends with a
number" for arithmetic tasks whose prompt asks for the final number only, or "the equations it
writes are true" (a shape bonus that cannot be earned with wrong arithmetic).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from rewards.registry import register

# A number at the very end: optional sign, digits with optional thousands commas and decimals,
# optionally a closing period and/or whitespace ("... is 1,234." / "19").
_ENDS_WITH_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?\.?\s*$")
# A written equation "a op b = c" between plain numbers (op one of + - * / x ×).
_EQUATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([-+*/x×])\s*(\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)(?![\d.]*\d)")
_OPS = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "x": float.__mul__, "×": float.__mul__,
        "/": lambda a, b: a / b if b else float("nan")}


def equations_hold(completion: str) -> bool:
    """True when `completion` writes at least one equation "a op b = c" and every one is true
    ("54 - 24 = 30" yes, "5 + 3 = 6" no): the arithmetic it shows is right, whatever the question."""
    found = _EQUATION.findall(completion)
    return bool(found) and all(abs(_OPS[op](float(a), float(b)) - float(c)) < 1e-9 for a, op, b, c in found)


def _tags_pattern(tags: Sequence[str]) -> re.Pattern:
    """`<a>...</a>\\s*<b>...</b>` for tags (a, b), each body non-greedy and free of its own tags."""
    parts = []
    for tag in tags:
        t = re.escape(tag)
        parts.append(rf"<{t}>(?:(?!</?{t}>).)*?</{t}>")
    return re.compile(r"\s*" + r"\s*".join(parts) + r"\s*", re.DOTALL)


@register("format")  # the class is the factory: its arguments are checked by name
class FormatReward:
    """`reward` when every configured check passes, else `penalty`.

    Checks (all that are configured must pass):
    - `tags`: the completion is exactly these XML-style blocks in order (whitespace between them);
    - `pattern`: a regex that must match the whole completion (`re.fullmatch`, DOTALL), or any part
      of it with `search=True`;
    - `ends_with_number`: the stripped completion ends with a number ("19", "It is 1,234.").
    - `equations`: it writes at least one equation "a op b = c" and each one is arithmetically true
      (`equations_hold`): no answer is looked at, only the consistency of what it wrote.
    With no argument at all the default is `tags=("think", "answer")`.

    Example:
        >>> fmt = FormatReward()
        >>> fmt(["q", "q"], ["<think>add</think>\\n<answer>19</answer>", "19"])
        [1.0, 0.0]
        >>> FormatReward(ends_with_number=True)(["q", "q"], ["The answer is 19.", "nineteen"])
        [1.0, 0.0]
    """

    def __init__(self, pattern: str | None = None, *, tags: Sequence[str] | None = None,
                 ends_with_number: bool = False, equations: bool = False, search: bool = False,
                 reward: float = 1.0, penalty: float = 0.0, false_equation_reward: float | None = None) -> None:
        if pattern is None and tags is None and not ends_with_number and not equations:
            tags = ("think", "answer")
        self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None  # user regex
        self.search = search  # match `pattern` anywhere instead of the whole completion
        self.tags = tuple(tags) if tags else ()  # required blocks, in order
        self._tags_re = _tags_pattern(self.tags) if self.tags else None
        self.ends_with_number = ends_with_number  # require a final number
        self.equations = equations  # require written equations, all of them true
        self.reward = reward  # score when the format is right
        self.penalty = penalty  # score when it is not
        # score when every check passes but some written equation is false (None: `penalty`)
        self.false_equation_reward = penalty if false_equation_reward is None else false_equation_reward

    def check(self, completion: str, equations: bool = True) -> bool:
        """True when `completion` passes every configured check (`equations=False`: all but that one)."""
        if self._tags_re is not None and not self._tags_re.fullmatch(completion):
            return False
        if self.pattern is not None:
            match = self.pattern.search if self.search else self.pattern.fullmatch
            if not match(completion):
                return False
        if self.ends_with_number and not _ENDS_WITH_NUMBER.search(completion):
            return False
        if equations and self.equations and not equations_hold(completion):
            return False
        return True

    def __call__(self, prompts: list[str], completions: list[str],
                 **columns: list[Any]) -> list[float | None]:
        """`reward`, `false_equation_reward` or `penalty` per completion; columns are ignored."""
        return [self.reward if self.check(c) else
                self.false_equation_reward if self.equations and self.check(c, equations=False) else self.penalty
                for c in completions]
