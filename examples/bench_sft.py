"""Benchmark: SFT tokens/s and peak memory of the default model, LoRA vs full fine-tuning.

    .venv/bin/python examples/bench_sft.py                 # lora and full, fp32 and bf16 autocast
    .venv/bin/python examples/bench_sft.py --steps 4 --methods lora --precisions none

Each method runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
Data: GSM8K train (question -> worked answer) from ../shared/data when present, else generated
arithmetic problems. The first step (warm-up, allocator growth) is excluded from tokens/s.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def one(method: str, steps: int, batch: int, max_length: int, threads: int, precision: str) -> dict:
    """Run `steps` SFT steps with `method` in this process and return its figures."""
    from align import sft
    from align.config import SFTConfig, load_config
    from align.tasks import train_and_heldout

    tmp = Path(tempfile.mkdtemp())
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: steps * batch * 2]]
        rows = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
        source = "gsm8k"
    else:
        rows = [{"prompt": r["prompt"], "completion": f"The answer is {r['answer']}."}
                for r in train_and_heldout(steps * batch * 2, 1)[0]]
        source = "generated arithmetic"
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SFTConfig, None, [
        f"data.path={tmp / 'd.jsonl'}", f"train.output_dir={tmp / 'run'}", f"train.max_steps={steps}",
        f"train.batch_size={batch}", f"data.max_length={max_length}", f"peft.method={method}",
        "log.progress=false", "log.plot=false", f"train.num_threads={threads}", "peft.r=16",
        f"train.autocast={precision}"])
    t0 = time.time()
    out = sft.run(cfg, callbacks=[])
    hist = out.result.history[1:] or out.result.history
    toks = sum(h["tokens_per_s"] * h["step_time"] for h in hist)
    secs = sum(h["step_time"] for h in hist)
    return {"method": method, "precision": "bf16 autocast" if precision == "bfloat16" else "fp32", "data": source, "steps": steps, "batch": batch, "max_length": max_length,
            "tokens_per_s": round(toks / secs, 1), "s_per_step": round(secs / len(hist), 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["lora", "full"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["none", "bfloat16"], help="train.autocast values")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="none", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.steps, a.batch, a.max_length, a.threads, a.precision)), flush=True)
        return
    results = []
    for m, prec in [(m, p) for m in a.methods for p in a.precisions]:
        cmd = [sys.executable, __file__, "--one", m, "--steps", str(a.steps), "--batch", str(a.batch),
               "--max-length", str(a.max_length), "--threads", str(a.threads), "--precision", prec]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[0][7:]))
    print(f"\nSFT on SmolLM2-135M-Instruct (fp32 weights, {a.threads} threads), data: {results[0]['data']}, "
          f"batch {a.batch}, max_length {a.max_length}, {a.steps} steps (first excluded)")
    print(f"{'method':8} {'precision':14} {'tokens/s':>9} {'s/step':>7} {'peak RSS GiB':>13}")
    for r in results:
        print(f"{r['method']:8} {r['precision']:14} {r['tokens_per_s']:>9} {r['s_per_step']:>7} {r['peak_rss_gib']:>13}")


if __name__ == "__main__":
    main()
