"""Arithmetic word problems with answers, generated locally (no data hub), and greedy replies to them.

The train and held-out sets come from disjoint seeds *and* disjoint (a, b, name, item) keys, so a
held-out question is never trained on.
"""
from __future__ import annotations

import random
import re
from typing import Any

NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Ines", "Yuki", "Pablo"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "coins", "cookies", "stamps"]
TEMPLATES = [
    ("{n} has {a} {item} and buys {b} more. How many {item} does {n} have now?", "+"),
    ("{n} has {a} {item} and gives away {b}. How many {item} does {n} have left?", "-"),
    ("{n} collects {a} {item} on Monday and {b} on Tuesday. How many {item} in total?", "+"),
]
SUFFIX = " Reply with only the final number."  # the default instruction (RL presets may set their own)


def _key(row: dict[str, Any]) -> tuple:
    return row["_key"]


def arithmetic_problems(n: int, seed: int = 0, lo: int = 2, hi: int = 60, exclude: set | None = None,
                        suffix: str = SUFFIX) -> list[dict]:
    """`n` distinct word problems: rows with `prompt` (chat messages), `answer` and `completion`."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        t = rng.randrange(len(TEMPLATES))
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if t == 1 and b > a:
            a, b = b, a
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        key = (t, a, b, name, item)
        if key in seen:
            continue
        seen.add(key)
        text, op = TEMPLATES[t]
        question = text.format(n=name, a=a, b=b, item=item) + suffix
        answer = a + b if op == "+" else a - b
        # The demonstration writes the sum out: a 135M model gets far more right that way.
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(answer),
                     "completion": f"{a} {op} {b} = {answer}", "_key": key})
    return rows


def train_and_heldout(n_train: int, n_eval: int, seed: int = 0, suffix: str = SUFFIX) -> tuple[list[dict], list[dict]]:
    """A held-out set first, then a train set that excludes every held-out question."""
    heldout = arithmetic_problems(n_eval, seed=seed + 1_000_003, suffix=suffix)
    train = arithmetic_problems(n_train, seed=seed, exclude={_key(r) for r in heldout}, suffix=suffix)
    for r in heldout + train:
        r.pop("_key")
    return train, heldout


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands commas removed), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def greedy_replies(model, tokenizer, rows: list[dict], batch_size: int = 16, max_new_tokens: int = 48) -> list[str]:
    """The greedy completion of each row's chat `prompt`, decoded (left-padded batches)."""
    import torch

    model.eval()
    tokenizer.padding_side = "left"
    replies = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        replies += [tokenizer.decode(ids, skip_special_tokens=True) for ids in out[:, enc["input_ids"].shape[1]:]]
    tokenizer.padding_side = "right"
    return replies
