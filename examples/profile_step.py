"""Where one main-job step's time goes: one generation and one update of the preset's batch shape,
each on one thread, with the time inside llama.cpp's decode and the learner's matrix-product rate.

    .venv/bin/python examples/profile_step.py            # 5 prompts x 8 samples, 64 new tokens

The generation runs on the llama.cpp engine (cProfile: time in `_decode`, i.e. `llama_decode`, against
sampling in torch); the update is the preset's (LoRA r16 / alpha 32, token-mean GRPO, micro-batches
of at most 1600 tokens, shared prompts, eager attention) on those samples, sampled at T 0.7 from the
base model (longer than the preset's trained replies), once to warm up, once timed, once under
torch's profiler with FLOP counts. Prints figures only; run it alone on the machine.
"""
import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import algorithms
from align.config import ModelConfig, PeftConfig
from align.experience import build_experience
from align.learners import PolicyLearner
from align.models import load_tokenizer, resolve_model, set_threads
from align.tasks import arithmetic_problems
from align.workers import RolloutWorker
from rollout import SamplingParams


def main() -> None:
    """Profile one generation and one update; print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation limit")
    ap.add_argument("--dtype", default="auto", help="the engine's weights (rollout.dtype): auto, bfloat16, float32")
    ap.add_argument("--autocast", default="auto", help="the learner's (train.autocast): auto, bfloat16, none")
    ap.add_argument("--attn", default="eager", help="the learner's attention (model.attn_implementation): sdpa, eager")
    args = ap.parse_args()
    set_threads(1)
    path = resolve_model("smollm2-135m-instruct")
    engine = RolloutWorker("llamacpp", path, num_threads=1, dtype=args.dtype)
    tok = load_tokenizer(ModelConfig(name=path))
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in arithmetic_problems(args.prompts, seed=5)]
    engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=4))  # warm-up: context, first decode
    sampling = SamplingParams(n=args.n, temperature=0.7, max_new_tokens=args.max_new_tokens, seed=0, logprobs=True)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    samples, _, _ = engine.generate(prompts, sampling)
    prof.disable()
    gen_s = time.perf_counter() - t
    decode_s = sum(v[2] for k, v in pstats.Stats(prof).stats.items() if k[2] == "_decode")
    tokens = sum(len(s.completion_ids) for s in samples)
    print(f"engine weights: {engine.engine.outtype}; learner autocast: {args.autocast}, attention: {args.attn}")
    print(f"generation: {gen_s:.1f} s for {len(samples)} samples, {tokens} new tokens; "
          f"{decode_s:.1f} s in llama_decode")

    for i, s in enumerate(samples):  # rewards do not change the cost: alternate 0 / 1 within groups
        s.reward = float(i % 2)
    exp = build_experience(samples, tok.pad_token_id)
    algo = algorithms.get("grpo", loss_agg="token-mean", scale_rewards="batch")
    exp.advantages = algo.advantages(**exp.tensors())
    learner = PolicyLearner(ModelConfig(name=path, attn_implementation=args.attn),
                            PeftConfig(method="lora", r=16, alpha=32), lr=5e-4,
                            total_steps=3, temperature=0.7, micro_batch_size=16, num_threads=1,
                            micro_batch_tokens=1600, share_prompt=True, amp=args.autocast)
    learner.update(exp, algo)  # warm-up
    t = time.perf_counter()
    learner.update(exp, algo)
    print(f"update: {time.perf_counter() - t:.1f} s on one thread")
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
        learner.update(exp, algo)
    rows = {k.key: k for k in p.key_averages()}
    mm = [rows[k] for k in ("aten::mm", "aten::bmm", "aten::addmm") if k in rows]
    flops, mm_s = sum(k.flops for k in mm), sum(k.self_cpu_time_total for k in mm) / 1e6
    print(f"update matrix products: {flops / 1e12:.2f} TFLOP in {mm_s:.1f} s = {flops / mm_s / 1e9:.0f} GFLOP/s")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    engine.engine.close()  # its GGUF copy of the model lives in /dev/shm


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
