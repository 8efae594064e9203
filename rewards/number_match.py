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

`digit_match` is partial credit by place value: the share of the gold's digits, aligned from the
ones, that the completion's last number gets right. Closeness pays a ones digit wrong ("18 + 45 =
62" for 63: 0.97) almost as much as the answer, and half of a trained main-job policy's wrong sums
were wrong there (README); by place a ones digit wrong costs as much as a carry.
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


def _digits(x: float) -> str | None:
    """The digits of an integer-valued `x` (sign dropped), or None for a fraction."""
    return str(abs(int(x))) if x == int(x) else None


@register("digit_match")
def digit_match(answer_field: str = "answer"):
    """Partial credit by place value: the share of places (aligned from the ones, over the longer
    of the two numbers) where the completion's last number has the gold's digit; 0 for a sign
    other than the gold's or no number, exact match only (1 or 0) where either is not an
    integer, None when the gold has no number. 63 for 63: 1; 62 or 53: 0.5; 163: 2/3."""

    def credit(got: float | None, want: float) -> float:
        if got is None or (got < 0) != (want < 0):
            return 0.0
        a, b = _digits(got), _digits(want)
        if a is None or b is None:
            return float(abs(got - want) < 1e-9)
        width = max(len(a), len(b))
        a, b = a.rjust(width), b.rjust(width)  # a place one number lacks counts as wrong
        return sum(x == y for x, y in zip(a, b)) / width

    return _scorer(answer_field, credit)
