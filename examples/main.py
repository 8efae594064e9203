"""The main job: teach the embedded default model (SmolLM2-135M-Instruct) arithmetic word problems.

    make main                      # from a fresh clone: sets up .venv, then runs this
    .venv/bin/python examples/main.py --steps 60

For now this is supervised fine-tuning with LoRA on generated problems with their answers; it
prints greedy held-out accuracy before and after (the held-out questions are never trained on).
"""
import argparse
import json
import time
from pathlib import Path

from align import sft
from align.config import SFTConfig, load_config
from align.models import load_causal_lm, load_tokenizer, set_threads
from align.tasks import greedy_accuracy, train_and_heldout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--train", type=int, default=480, help="generated training problems")
    p.add_argument("--heldout", type=int, default=100, help="held-out problems for accuracy")
    p.add_argument("--out", default="runs/main", help="run directory")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    args = p.parse_args()
    set_threads(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = train_and_heldout(args.train, args.heldout)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    cfg = load_config(SFTConfig, None, [
        f"data.path={out / 'train.jsonl'}", f"train.output_dir={out}", f"train.max_steps={args.steps}",
        "train.batch_size=8", "train.lr=3e-4", "peft.method=lora", "peft.r=16", "data.max_length=128",
        *args.overrides])
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    t0 = time.time()
    before = greedy_accuracy(model, tokenizer, heldout)
    print(f"[main] held-out greedy accuracy before: {before:.1%} ({len(heldout)} problems)", flush=True)
    result = sft.run(cfg, model, tokenizer)
    after = greedy_accuracy(result.model, tokenizer, heldout)
    print(f"[main] held-out greedy accuracy after {args.steps} SFT steps: {after:.1%} "
          f"(before {before:.1%}); {time.time() - t0:.0f} s in all; run directory {out}", flush=True)


if __name__ == "__main__":
    main()
