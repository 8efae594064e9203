"""A preference-tuning sweep on the default model: DPO / IPO / ORPO / SimPO, two betas each, LoRA.

    .venv/bin/python examples/sweep_preference.py                    # generated arithmetic pairs, ~10 min on 2 cores
    .venv/bin/python examples/sweep_preference.py --data ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz
    .venv/bin/python examples/sweep_preference.py base.train.max_steps=30 output_dir=runs/longer

The sweep itself is `examples/sweep_preference.yaml` (any `key=value` here overrides it; `base.`
reaches into the stage config). This script writes its data first:
- by default, arithmetic word problems from `align.tasks` (train and held-out questions disjoint):
  chosen = the correct worked answer "a + b = c", rejected = the same with a wrong result (off by
  1 to 10), so the preference is about the arithmetic alone;
- with `--data PATH`, HH-RLHF-style chosen / rejected transcripts (the prompt is their shared
  prefix), with max_length 256.
Running it again resumes the sweep (finished trials are kept); use a new `output_dir=` for a new
one. Results: OUTPUT_DIR/results.md, results.csv, results.png and one run directory per trial.
"""
import argparse
import gzip
import json
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def arithmetic_pairs(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Correct vs wrong worked answers to generated word problems (train and held-out disjoint)."""
    from align.tasks import train_and_heldout

    rng = random.Random(seed)

    def pair(row: dict) -> dict:
        head, answer = row["completion"].rsplit("= ", 1)
        wrong = int(answer) + rng.choice([-1, 1]) * rng.randint(1, 10)
        return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": f"{head}= {wrong}"}

    train, held = train_and_heldout(n_train, n_eval, seed=seed)
    return [pair(r) for r in train], [pair(r) for r in held]


def transcript_pairs(path: str, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """The first rows of a chosen / rejected transcript file, shuffled with seed 0, split in two."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    random.Random(0).shuffle(rows)
    return rows[:n_train], rows[n_train:n_train + n_eval]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="HH-RLHF-style JSONL(.gz) of chosen/rejected transcripts (default: generated pairs)")
    p.add_argument("--eval", type=int, default=48, help="held-out pairs")
    p.add_argument("--config", default=str(HERE / "sweep_preference.yaml"), help="the sweep YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep YAML")
    a = p.parse_args()
    from align.sweep import load_sweep, run_sweep

    cfg = load_sweep(a.config, a.overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_train = (cfg.base["train"]["max_steps"] * cfg.base["train"]["batch_size"]
               * cfg.base["train"].get("grad_accum", 1))  # one epoch: every pair seen once
    overrides = list(a.overrides)
    if a.data:
        train, held = transcript_pairs(a.data, n_train, a.eval)
        overrides.append("base.data.max_length=256")
    else:
        train, held = arithmetic_pairs(n_train, a.eval)
    for name, rows in (("train", train), ("eval", held)):
        path = out / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.is_file() or path.read_text() != text:  # rewrite only on change: resume needs the same data
            path.write_text(text)
    overrides += [f"base.data.path={out / 'train.jsonl'}", f"base.data.eval_path={out / 'eval.jsonl'}"]
    t0 = time.time()
    res = run_sweep(a.config, overrides)
    print((res.sweep_dir / "results.md").read_text())
    print(f"sweep wall time {time.time() - t0:.0f} s ({'resumed' if res.restored else 'fresh'}); "
          f"plot {res.sweep_dir / 'results.png'}")


if __name__ == "__main__":
    main()
