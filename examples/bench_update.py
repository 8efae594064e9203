"""Benchmark: one GRPO update of the main job's shape, two ways of computing it side by side.

    .venv/bin/python examples/bench_update.py [--reps 3] [--threads 2]    # prompts per row vs once per group
    .venv/bin/python examples/bench_update.py --compare head --threads 1 --autocast auto --attn eager
        # the frozen LM head whole-tiled vs chunked with its gradient in the forward (align/fused_head.py)
    .venv/bin/python examples/bench_update.py --compare replay --groups 5 --n 8 --lengths tail --threads 1 --autocast auto --attn eager
        # whole-group micro-batches vs every prompt once + rows cut by length (align/prompt_replay.py)

SmolLM2-135M-Instruct + LoRA r=16 on all linear layers, fp32, 8 prompt groups x 4 samples: the main
job's chat-templated prompts (about 60 tokens), completions of 35-65 random tokens, micro-batches of
at most 1600 tokens (the preset's `algorithm.micro_batch_tokens`). Prints the seconds of one
`PolicyLearner.backward` (forward + backward over the whole batch) each way, alternating, so that
both see the same machine load.
"""
import argparse
import time

import torch

import algorithms
from align import fused_head, prompt_replay
from align.config import ModelConfig, PeftConfig
from align.experience import build_experience
from align.learners import MetricSums, PolicyLearner
from align.models import resolve_model
from align.tasks import train_and_heldout
from align.types import Sample


def batch(tokenizer, groups: int = 8, n: int = 4, seed: int = 0, tail: bool = False) -> list[Sample]:
    """`groups` x `n` samples: real prompts, random completions of 35-65 tokens (with `tail`, as a
    trained RL policy's: 14-32 tokens, and one sample in each group 40-64), rewards 0 / 1."""
    rows, _ = train_and_heldout(groups, 0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g, row in enumerate(rows):
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)  # a chat
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for k in range(n):
            low, high = ((40, 65) if k == 0 else (14, 33)) if tail else (35, 66)
            length = int(torch.randint(low, high, (1,), generator=gen))
            ids = torch.randint(100, 40000, (length,), generator=gen).tolist()
            out.append(Sample(prompt=text, prompt_ids=prompt_ids, completion="", completion_ids=ids,
                              logprobs=[-1.0] * length, group_id=g, reward=float(k % 2)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed updates per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", choices=("prompt", "head", "replay"), default="prompt",
                   help="prompt: share_prompt off / on (whole-group micro-batches); head: the frozen head tiled / "
                        "fused; replay: whole-group micro-batches / every prompt once, rows cut by length")
    p.add_argument("--groups", type=int, default=8, help="prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--lengths", choices=("uniform", "tail"), default="uniform",
                   help="completion lengths: uniform 35-65, or tail (14-32 and one 40-64 per group)")
    p.add_argument("--autocast", default="none", help="the learner's train.autocast: none, auto, bfloat16")
    p.add_argument("--attn", default="sdpa", help="the learner's model.attn_implementation")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model("smollm2-135m-instruct")
    learner = PolicyLearner(ModelConfig(name=path, attn_implementation=a.attn), PeftConfig(method="lora", r=16, alpha=32),
                            lr=1e-4, total_steps=10, temperature=0.7, micro_batch_size=16, num_threads=a.threads,
                            micro_batch_tokens=1600, amp=a.autocast)
    from transformers import AutoTokenizer

    samples = batch(AutoTokenizer.from_pretrained(path), a.groups, a.n, tail=a.lengths == "tail")
    exp = build_experience(samples, 2)
    algo = algorithms.get("grpo", loss_agg="token-mean", kl_coef=0.0)
    exp.advantages = algo.advantages(**exp.tensors())
    prompt = sum(len(s.prompt_ids) for s in samples) / len(samples)
    completion = sum(len(s.completion_ids) for s in samples) / len(samples)
    print(f"{len(samples)} rows: prompts {prompt:.0f} tokens, completions {completion:.0f} on average; {a.threads} threads")
    usable, replayable = fused_head.usable, prompt_replay.can_replay
    names = {"prompt": ("share_prompt=false", "share_prompt=true"), "head": ("head tiled", "head fused"),
             "replay": ("whole groups", "prompt replay")}[a.compare]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.reps + 1):  # the first round warms up
        for k, name in enumerate(names):
            # what is switched off below is the path a model without the feature takes
            learner.shared = bool(k) or a.compare != "prompt"
            prompt_replay.can_replay = replayable if k or a.compare != "replay" else (lambda *_: False)
            fused_head.usable = usable if k or a.compare != "head" else (lambda head: False)
            learner.optimizer.zero_grad(set_to_none=True)
            t = time.perf_counter()
            learner.backward(exp, algo.loss, MetricSums())
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        ts = ts[1:]
        print(f"{name:18}  forward + backward {sum(ts) / len(ts):5.1f} s (runs: {', '.join(f'{x:.1f}' for x in ts)})")


if __name__ == "__main__":
    main()
