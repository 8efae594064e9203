"""Benchmark: DAPO's dynamic sampling vs DUPO's duplication on the default model and the arithmetic task.

    .venv/bin/python examples/bench_dapo_dupo.py                 # 4 steps each, one after the other
    .venv/bin/python examples/bench_dapo_dupo.py --steps 6 rollout.max_new_tokens=32

Both start from the same model, prompts and seed; each reports generated samples per trained batch
(DAPO generates more prompts until every group in the batch has reward variance; DUPO fills the
freed slots by copying informative groups, so it never generates more) and wall time per step.
Extra arguments are config overrides applied to both runs.
"""
import argparse
import tempfile
import time

from align import rl
from align.config import load_config
from align.rl_config import RLConfig
from pathlib import Path

PRESET = Path(__file__).with_name("grpo_arithmetic.yaml")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    rows = []
    for algo in ("dapo", "dupo"):
        out_dir = Path(tempfile.mkdtemp(prefix=f"bench-{algo}-"))
        cfg = load_config(RLConfig, PRESET, [f"algorithm.name={algo}", f"train.max_steps={a.steps}",
                                             f"train.output_dir={out_dir}", "train.eval_before=false",
                                             "log.progress=false", "algorithm.params={}",
                                             *a.overrides])
        t0 = time.time()
        hist = rl.run(cfg)["history"]
        wall = time.time() - t0
        gen = sum(h["samples_generated"] for h in hist) / len(hist)
        trained = sum(h["samples_trained"] for h in hist) / len(hist)
        step = sum(h["time/step"] for h in hist) / len(hist)
        rows.append((algo, gen, trained, gen / trained, step, sum(h.get("gen_rounds", 1) for h in hist) / len(hist),
                     sum(h.get("duplicated_frac", 0.0) for h in hist) / len(hist), wall))
    print(f"\n{a.steps} steps each, {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n} samples per batch, "
          f"max {cfg.rollout.max_new_tokens} new tokens")
    print(f"{'algo':6} {'generated/step':>15} {'trained/step':>13} {'gen per trained':>16} {'s/step':>8} "
          f"{'gen rounds':>11} {'dup frac':>9}")
    for algo, gen, tr, ratio, step, rounds, dup, wall in rows:
        print(f"{algo:6} {gen:>15.1f} {tr:>13.1f} {ratio:>16.2f} {step:>8.1f} {rounds:>11.2f} {dup:>9.2f}")


if __name__ == "__main__":
    main()
