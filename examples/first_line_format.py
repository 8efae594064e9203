"""How often the base model's greedy reply to a held-out arithmetic problem is, in its first line,
already the main job's format (a one-line written sum), and its accuracy on the first line against
the whole reply: the measurement behind examples/results/main_job.md's note on `rollout.stop=["\\n"]`.

    .venv/bin/python examples/first_line_format.py --seeds 0 1 2
"""
import argparse
import re

import torch

from align.config import ModelConfig
from align.models import load_causal_lm, load_tokenizer
from align.tasks import greedy_replies, last_number, train_and_heldout

SUFFIX = " Reply with only the final number."  # the main job's instruction until session 21 (the README's measurements with this script)
# the preset's format-reward pattern (a whole line: some words, "a + b = c" or "a - b = c", some words)
FORMAT = re.compile(r"[^\n=]*?\d+\s*[-+]\s*\d+\s*=\s*\d+[^\d\n=]*\s*")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    mc = ModelConfig(name="smollm2-135m-instruct")
    tok = load_tokenizer(mc)
    model = load_causal_lm(mc, device="cpu").eval()
    for seed in a.seeds:
        _, held = train_and_heldout(200, 100, seed=seed, suffix=SUFFIX)  # the main job's held-out set
        whole = first = fmt = 0
        for r, text in zip(held, greedy_replies(model, tok, held, batch_size=50, max_new_tokens=64)):
            line = text.split("\n")[0]
            whole += last_number(text) == r["answer"]
            first += last_number(line) == r["answer"]
            fmt += bool(FORMAT.fullmatch(line))
        n = len(held)
        print(f"seed {seed}: first line in the format {fmt / n:.0%}; accuracy whole reply {whole / n:.0%}, "
              f"first line {first / n:.0%} ({n} held-out problems, greedy, 64 new tokens)")


if __name__ == "__main__":
    main()
