"""Exact numeric answers without math-verify: 1.0 when the last number of the completion equals the
gold's, as lm-evaluation-harness's GSM8K "flexible-extract" scores them.

For machines without math-verify (the bare GPU machine of `examples/gpu_check.py`) and for tasks
whose answers are plain numbers; `math_accuracy` is the general check (LaTeX, fractions, sets).

`number_closeness` is partial credit beside an exact-answer reward: 1 - |x - gold| / (tolerance *
max(|gold|, 1)), floored at 0, for the completion's last number x. A small policy that sets up the
right sum and carries wrongly ("55 + 54 = 119" for 109) then earns more than one that picks the
wrong operation ("57 - 55 = 2" for 112), which an exact check scores the same (both 0). With
`exclude_prompt_numbers` a last number copied from the prompt earns nothing: otherwise a reply that
only restates the question ("Ravi collects 11 apples on Monday and 29 on Tuesday", gold 40) earns
as much as a written sum's format bonus, and a policy can settle there.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from rewards.math_accuracy import normalize_gold
from rewards.registry import register

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    """The last number in `text` ("1,234" -> 1234.0), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _numbers(text: str) -> set[float]:
    """Every number in `text`, as floats."""
    return {float(n.replace(",", "")) for n in _NUMBER.findall(text)}


def _scorer(answer_field: str, credit: Callable[[float | None, float], float],
            exclude_prompt_numbers: bool = False) -> Callable[..., list[float | None]]:
    """A reward function scoring each completion's last number (None if it has none) against the
    gold's with `credit(got, want)`; None where the gold holds no number. With
    `exclude_prompt_numbers`, a last number that also appears in the prompt counts as none."""

    def score(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        golds = columns.get(answer_field) or [None] * len(completions)
        wants = [_last_number(normalize_gold(gold) or "") for gold in golds]
        out: list[float | None] = []
        for prompt, want, text in zip(prompts, wants, completions):
            got = _last_number(text)
            if exclude_prompt_numbers and got is not None and got in _numbers(prompt):
                got = None
            out.append(None if want is None else credit(got, want))
        return out

    return score


@register("number_match")
def number_match(answer_field: str = "answer"):
    """1.0 when the completion's last number equals the gold's (the `answer_field` column, GSM8K's
    '#### 18' understood), 0.0 when not, None when the gold holds no number."""
    return _scorer(answer_field, lambda got, want: float(got is not None and abs(got - want) < 1e-9))


@register("number_closeness")
def number_closeness(answer_field: str = "answer", tolerance: float = 0.5,
                     exclude_prompt_numbers: bool = False):
    """Partial credit for a last number near the gold's: 1 at the gold, falling linearly to 0 at a
    relative error of `tolerance` (of max(|gold|, 1)); 0 without a number, None when the gold has
    none; with `exclude_prompt_numbers`, 0 for a last number copied from the prompt."""
    if tolerance <= 0:
        raise ValueError(f"number_closeness: tolerance must be > 0, got {tolerance}")

    def credit(got: float | None, want: float) -> float:
        if got is None:
            return 0.0
        return max(0.0, 1.0 - abs(got - want) / (tolerance * max(abs(want), 1.0)))

    return _scorer(answer_field, credit, exclude_prompt_numbers)
