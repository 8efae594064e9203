"""What the base model does with each candidate instruction (`data.prompt_suffix`) before any
training: greedy accuracy and how often its reply is already in the main job's format (the preset's
format-reward pattern), greedy and sampled at the preset's temperature, with the sampled replies'
mean length; on the main job's held-out problems (seeds 0 and 1) and the user-written templates'
test set (examples/user_templates.py). The measurement behind the preset's instruction.

    .venv/bin/python examples/compare_instructions.py " Reply with only the final number." " Reply in one short sentence."
"""
import argparse
import json
import re
import tempfile
from pathlib import Path

import torch

from align.config import load_config
from align.models import load_causal_lm, load_tokenizer
from align.rl_config import RLConfig
from align.tasks import last_number, train_and_heldout
from rollout.base import SamplingParams
from rollout.llamacpp import LlamaCppEngine
from user_templates import PRESET, write


def problem_sets() -> dict[str, list[tuple[str, str]]]:
    """(question without instruction, gold answer) of each set, as the main job and the templates script build them."""
    sets = {}
    for seed in (0, 1):
        _, held = train_and_heldout(200, 100, seed=seed, suffix="")
        sets[f"held-out seed {seed}"] = [(r["prompt"][0]["content"], r["answer"]) for r in held]
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "test.jsonl", 100, 1, set())  # the templates script's test set (same seed, nothing excluded before it)
        rows = [json.loads(line) for line in open(Path(d) / "test.jsonl")]
    sets["user templates"] = [(r["prompt"], r["answer"]) for r in rows]
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suffixes", nargs="+", help="instructions appended to each question (mind the leading space)")
    p.add_argument("--sampled", type=int, default=40, help="questions of each set sampled n=4 times at the preset's temperature")
    p.add_argument("--rows", type=int, default=100, help="questions of each set answered greedily (at most 100)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    cfg = load_config(RLConfig, PRESET, [])
    fmt = re.compile([f for f in cfg.reward.functions if f.name == "format"][0].kwargs["pattern"])
    tok = load_tokenizer(cfg.model)
    engine = LlamaCppEngine(load_causal_lm(cfg.model, device="cpu"), tok, num_threads=a.threads)
    torch.set_num_threads(a.threads)
    r = cfg.rollout
    greedy = SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens)
    sampled = SamplingParams(n=4, temperature=r.temperature, max_new_tokens=r.max_new_tokens, seed=0)
    sets = problem_sets()
    try:
        for suffix in a.suffixes:
            print(f"instruction {suffix!r}")
            for name, rows in sets.items():
                rows = rows[:a.rows]
                prompts = [tok.apply_chat_template([{"role": "user", "content": q + suffix}], add_generation_prompt=True,
                                                   tokenize=False) for q, _ in rows]
                g = engine.generate(prompts, greedy)
                s = engine.generate(prompts[:a.sampled], sampled)
                acc = sum(last_number(x.completion) == gold for x, (_, gold) in zip(g, rows)) / len(rows)
                g_fmt = sum(bool(fmt.fullmatch(x.completion)) for x in g) / len(g)
                s_fmt = sum(bool(fmt.fullmatch(x.completion)) for x in s) / len(s)
                s_len = sum(len(x.completion_ids) for x in s) / len(s)
                print(f"  {name:17s} greedy: accuracy {acc:4.0%}, format {g_fmt:4.0%} | sampled (T {r.temperature}, "
                      f"{len(s)}): format {s_fmt:4.0%}, {s_len:.0f} tokens | e.g. {g[0].completion[:90]!r}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
