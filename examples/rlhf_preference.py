"""The preference that examples/rlhf.py teaches: after the calculation, state the result in a full
sentence ("44 + 22 = 66. So Tom has 66 apples now.") rather than stop at the bare calculation.

Everything here is a rule, so the pairs, the demonstrations and the held-out measure all come from
it: `sentence()` writes the chosen reply's sentence from the question, `states_result()` is the
measure (a reward function for `align.rl`, used with weight 0: logged, never optimised).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from align.tasks import train_and_heldout

SUFFIX = " Answer with the calculation."  # the instruction: it asks for the calculation, not for a sentence
# How a sentence states the result; {n} name, {r} result, {i} item, {w} "now" / "left" / "in total".
STYLES = ["{n} has {r} {i} {w}.", "So {n} has {r} {i} {w}.", "That makes {r} {i} for {n}.", "The answer is {r} {i}."]
UNSEEN = "In the end, {n} ends up with {r} {i}."  # never in the data: the breakdown's generalisation check
_QUESTION = re.compile(r"^(\w+) (?:has|collects) \d+ (\w+)")
# the reply ends with a sentence (at the start or after . ! ?) that opens with a capital letter, holds
# no "=", names a number with a word after it ("66 apples") and closes with . or !
_STATES = re.compile(r"(?:^|[.!?]\s+)[A-Z][^.!?=\n]*\b\d+ [a-z]+[^.!?=\n]*[.!]\s*$")


def sentence(question: str, result: str, style: str) -> str:
    """`style` filled in for a generated arithmetic question (align/tasks.py) and its result."""
    name, item = _QUESTION.match(question).groups()
    when = "left" if "gives away" in question else "in total" if "in total" in question else "now"
    return style.format(n=name, r=result, i=item, w=when)


def states_result(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 where the reply ends by stating a result in a full sentence, else 0.0 (the held-out
    measure of the preference; it does not check the arithmetic, math_accuracy does)."""
    return [float(bool(_STATES.search(c.strip()))) for c in completions]


def make_data(out: Path, n: int, share: float = 0.25) -> None:
    """demos.jsonl (SFT: the bare calculation, with a sentence after it in `share` of them, so the
    SFT policy samples both) and pairs.jsonl (RM: calculation + sentence over the bare calculation)
    for `n` generated problems that exclude PPO's 50 held-out questions."""
    train, _ = train_and_heldout(n, 50, seed=0, suffix=SUFFIX)
    rng = random.Random(7)
    demos, pairs = [], []
    for r in train:
        q, calc = r["prompt"][0]["content"], r["completion"]
        full = f"{calc}. {sentence(q, r['answer'], rng.choice(STYLES))}"
        demos.append({"prompt": r["prompt"], "completion": full if rng.random() < share else calc})
        pairs.append({"prompt": r["prompt"], "chosen": f"{calc}. {sentence(q, r['answer'], rng.choice(STYLES))}",
                      "rejected": calc})
    for name, rows in (("demos", demos), ("pairs", pairs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
