"""Is the main job's preset tuned to its own generator's wording? Sums and differences phrased in
templates that `align.tasks` never produces, written as a user's JSONL train / test files, then the
preset unchanged (examples/grpo_arithmetic.yaml) on them.

    .venv/bin/python examples/user_templates.py --out runs/user-templates [key=value overrides ...]

Prints held-out greedy accuracy before -> after, as `make main` does.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

from align import rl
from align.config import load_config
from align.rl_config import RLConfig

PRESET = Path(__file__).with_name("grpo_arithmetic.yaml")
# (template, operation): none of these sentences is in align.tasks.TEMPLATES
TEMPLATES = [
    ("A train carries {a} passengers. At the next station {b} more get on. How many passengers are on the train?", "+"),
    ("There were {a} birds on a roof and {b} flew away. How many birds are still on the roof?", "-"),
    ("A baker made {a} loaves in the morning and {b} in the afternoon. How many loaves did the baker make?", "+"),
    ("{n} had {a} dollars and spent {b} dollars on a gift. How much money does {n} have now?", "-"),
    ("A library lent out {a} books on Friday and {b} books on Saturday. How many books were lent out?", "+"),
    ("A tank held {a} litres of water. {b} litres leaked out. How many litres are left in the tank?", "-"),
    ("Our class read {a} pages last week and {b} pages this week. How many pages did we read?", "+"),
    ("A farmer picked {a} pumpkins and sold {b} of them. How many pumpkins does the farmer have left?", "-"),
]
NAMES = ["Jonas", "Priya", "Ahmed", "Chloe", "Diego", "Hana"]


def write(path: Path, n: int, seed: int, seen: set) -> None:
    """`n` problems as JSONL rows {"prompt", "answer"}, none sharing (template, a, b) with `seen`."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        t, a, b = rng.randrange(len(TEMPLATES)), rng.randint(2, 60), rng.randint(2, 60)
        text, op = TEMPLATES[t]
        if op == "-" and b > a:
            a, b = b, a
        if (t, a, b) in seen:
            continue
        seen.add((t, a, b))
        rows.append({"prompt": text.format(a=a, b=b, n=rng.choice(NAMES)), "answer": str(a + b if op == "+" else a - b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/user-templates")
    a, overrides = p.parse_known_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    write(out / "test.jsonl", 500, 1, seen)  # as many as the preset's data.eval_size
    write(out / "train.jsonl", 1000, 2, seen)
    cfg = load_config(RLConfig, PRESET, [f"data.path={out / 'train.jsonl'}", f"data.eval_path={out / 'test.jsonl'}",
                                         f"train.output_dir={out / 'run'}", *overrides])
    t0 = time.time()
    res = rl.run(cfg)
    b, af = res["before"].get("eval/accuracy", float("nan")), res["after"].get("eval/accuracy", float("nan"))
    print(f"\n[user-templates] held-out greedy accuracy {b:.1%} -> {af:.1%} ({len(TEMPLATES)} templates the generator "
          f"never writes, {res['after'].get('eval/n', 0)} problems); wall {time.time() - t0:.0f} s", file=sys.stdout)


if __name__ == "__main__":
    main()
