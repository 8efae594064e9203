"""Benchmark: the same DPO run with align and with TRL's DPOTrainer, side by side, on this machine.

    .venv/bin/python examples/bench_dpo.py                     # 6 steps each, HH-RLHF harmless pairs
    .venv/bin/python examples/bench_dpo.py --steps 10 --threads 2 --precision fp32
    .venv/bin/python examples/bench_dpo.py --only align        # one side (e.g. while profiling)

One configuration for both: SmolLM2-135M-Instruct (the embedded default), LoRA r=16 / alpha 32 /
dropout 0 on all linear layers, DPO sigmoid beta 0.1, batch 8, max length 256, gradient
checkpointing off, AdamW at one learning rate, bf16 autocast (TRL's default `bf16=True`; pass
`--precision fp32` for both in fp32), no eval, the same torch thread count. The data are the first
`steps x batch` of HH-RLHF harmless-base pairs (../shared/data; a benchmark may read it), shuffled
with seed 0 and split into explicit prompt / chosen / rejected strings at the last shared
"Assistant:" (no chat template on either side); without that file, generated arithmetic pairs.

Each side runs in its own subprocess, one after the other. TRL runs as its users run it: a
`DPOConfig`, a `peft_config`, `trainer.train()`, its defaults otherwise (reference log-probs from
the disabled adapter at every step). align runs `align.preference.run` with its defaults
(reference log-probs precomputed once before training; no cache from an earlier run). The
timed span on both sides is trainer set-up (tokenising) + training, with the model already
loaded; pairs/s = pairs trained / that span. The median step time is printed too.
"""
import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def write_pairs(path: Path, n: int, data: str) -> str:
    """n explicit prompt / chosen / rejected string rows (HH-RLHF when present, else arithmetic)."""
    if Path(data).is_file():
        from align.pairs import split_transcripts

        rows = [json.loads(line) for line in gzip.open(data, "rt")]
        random.Random(0).shuffle(rows)
        out = []
        for r in rows:
            p, c, rj = split_transcripts(r["chosen"], r["rejected"])
            if c.strip() and rj.strip():
                out.append({"prompt": p, "chosen": c, "rejected": rj})
        source = "HH-RLHF harmless-base"
    else:
        from align.tasks import arithmetic_problems

        rng = random.Random(0)
        out = []
        for r in arithmetic_problems(n, seed=0):
            wrong = int(r["answer"]) + rng.choice([-3, -2, -1, 1, 2, 3])
            a, rest = r["completion"].rsplit("=", 1)
            out.append({"prompt": r["prompt"][0]["content"] + "\n", "chosen": r["completion"],
                        "rejected": f"{a}= {wrong}"})
        source = "generated arithmetic pairs"
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:n]))
    return source


def run_align(a, data: Path, out: Path) -> dict:
    """align's DPO stage on `data`; returns timings."""
    import torch

    from align import preference
    from align.config import load_config
    from align.models import load_causal_lm, load_tokenizer

    cfg = load_config(preference.PreferenceConfig, None, [
        f"data.path={data}", "data.template=none", f"data.max_length={a.max_length}",
        f"train.output_dir={out / 'align-run'}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch}",
        f"train.lr={a.lr}", "train.warmup_ratio=0", "train.scheduler=linear", f"train.num_threads={a.threads}",
        f"train.autocast={'bfloat16' if a.precision == 'bf16' else 'none'}", "peft.method=lora", "peft.r=16",
        "peft.alpha=32", "peft.dropout=0", "algorithm.name=dpo", "algorithm.params.beta=0.1",
        "log.progress=false", "log.plot=false"])
    model, tok = load_causal_lm(cfg.model), load_tokenizer(cfg.model)
    spent = []
    attach = preference.attach_reference

    def timed_attach(*args, **kw):  # how much of the span the one-off reference pass takes
        t = time.perf_counter()
        out = attach(*args, **kw)
        spent.append(time.perf_counter() - t)
        return out

    preference.attach_reference = timed_attach
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = preference.run(cfg, model, tok)
    wall = time.perf_counter() - t0
    steps = [h["step_time"] for h in res.result.history]
    return {"wall_s": wall, "step_s": steps, "loss": [h["loss"] for h in res.result.history],
            "reference_s": sum(spent)}


def run_trl(a, data: Path, out: Path) -> dict:
    """TRL's DPOTrainer on `data`, as its documentation shows; returns timings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from align.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=str(data), split="train")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(output_dir=str(out / "trl-run"), per_device_train_batch_size=a.batch, max_length=a.max_length,
                     max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, beta=0.1,
                     gradient_checkpointing=False, bf16=a.precision == "bf16", use_cpu=True, logging_steps=1,
                     save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[StepTimer()])
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "step_s": times, "loss": losses}


def child(a) -> None:
    """One side, in this process; writes its result as JSON."""
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    load = os.getloadavg()[0]
    res = (run_align if a.side == "align" else run_trl)(a, out / "pairs.jsonl", out)
    res["load"] = [load, os.getloadavg()[0]]  # 1-minute load average before and after: a shared machine
    (out / f"{a.side}.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(HH), help="HH-RLHF-style JSONL(.gz) of chosen/rejected transcripts")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps on each side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--only", choices=["align", "trl"], help="run one side only")
    p.add_argument("--out", default="runs/bench-dpo")
    p.add_argument("--side", choices=["align", "trl"], help=argparse.SUPPRESS)  # internal: the child
    a = p.parse_args()
    if a.side:
        return child(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.rmtree(out / "align-run", ignore_errors=True)  # no reference cache from an earlier run
    source = write_pairs(out / "pairs.jsonl", a.steps * a.batch, a.data)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    results = {}
    for side in [a.only] if a.only else ["align", "trl"]:
        argv = [sys.executable, __file__, "--side", side] + [x for x in sys.argv[1:] if not x.startswith("--only")
                                                             and x not in ("align", "trl")]
        print(f"--- {side} ...", flush=True)
        subprocess.run(argv, env=env, check=True)
        results[side] = json.loads((out / f"{side}.json").read_text())
    pairs = a.steps * a.batch
    print(f"\nDPO sigmoid, SmolLM2-135M-Instruct + LoRA r=16 all linear, {source}, {a.steps} steps x batch "
          f"{a.batch}, max length {a.max_length}, {a.precision}, {a.threads} threads per side")
    for side, r in results.items():
        ref = f", of which reference pass {r['reference_s']:.1f} s" if "reference_s" in r else ""
        print(f"{side:>5}: {pairs / r['wall_s']:.3f} pairs/s  (set-up + training {r['wall_s']:.1f} s{ref}; "
              f"median step {statistics.median(r['step_s']):.2f} s; load average {r['load'][0]:.1f} -> "
              f"{r['load'][1]:.1f}; losses {[round(x, 3) for x in r['loss']]})")
    if len(results) == 2:
        ratio = results["trl"]["wall_s"] / results["align"]["wall_s"]
        step_ratio = statistics.median(results["trl"]["step_s"]) / statistics.median(results["align"]["step_s"])
        print(f"align / TRL: {ratio:.2f}x pairs/s end to end, {step_ratio:.2f}x per median step")


if __name__ == "__main__":
    main()
