"""Benchmark: the llama.cpp engine's generation time for each GGUF weight type, on this CPU.

    .venv/bin/python examples/bench_llamacpp_types.py                    # f32, bf16, f16, q8_0; 2 rounds
    .venv/bin/python examples/bench_llamacpp_types.py --types f32 bf16 --rounds 3

The main job's batch (8 generated arithmetic prompts x 4 samples, <= 64 new tokens, temperature
0.7, one thread) on SmolLM2-135M-Instruct, one engine per type, the types taking turns in each
round so that the machine's drift touches all of them alike. Which type `rollout.dtype: auto`
should map to depends on the CPU's units (bf16, VNNI); this prints the figures to decide by.
Run it alone on the machine.
"""
import argparse
import time

from align.config import ModelConfig
from align.models import load_tokenizer, resolve_model, set_threads
from align.tasks import arithmetic_problems
from rollout import SamplingParams
from rollout.llamacpp import OUTTYPES, LlamaCppEngine


def main() -> None:
    """Time one generation per type per round; print seconds and tokens/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", choices=OUTTYPES, default=["f32", "bf16", "f16", "q8_0"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(ModelConfig(name=path))
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in arithmetic_problems(8, seed=5)]
    sampling = SamplingParams(n=4, temperature=0.7, max_new_tokens=64, seed=0, logprobs=True)
    engines = {t: LlamaCppEngine(path, num_threads=args.threads, outtype=t) for t in args.types}
    try:
        for e in engines.values():  # warm-up: context and first decode
            e.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=4))
        for r in range(args.rounds):
            for t, e in engines.items():
                start = time.perf_counter()
                samples = e.generate(prompts, sampling)
                dt = time.perf_counter() - start
                n = sum(len(s.completion_ids) for s in samples)
                print(f"round {r + 1} {t:>5}: {dt:5.1f} s, {n} tokens, {n / dt:4.0f} tokens/s", flush=True)
    finally:
        for e in engines.values():
            e.close()  # each holds a GGUF copy of the model in /dev/shm


if __name__ == "__main__":
    main()
