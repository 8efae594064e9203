"""Multi-turn RL with a tool: the default model learns to use a calculator for word problems.

    .venv/bin/python examples/tool_calculator.py --out runs/tools   # the full run (README: time, result)
    .venv/bin/python examples/tool_calculator.py --quick            # a few steps of each stage (smoke run)

The problems multiply two 2-digit numbers ("Mei packs 37 stickers into each of 24 boxes..."): a
135M model gets few right in its head, and a calculator call gets every one right if the model
writes the call and then copies the result. Stages:
1. A short SFT (LoRA, merged) on tool-use demonstrations the script writes: the question, the call
   `<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 24"}}</tool_call>`, the tool's
   answer, then the number. The system message offering the tool is the one the RL episodes use
   (`align.tools.tool_instructions`: SmolLM2's template has no `tools` argument).
2. GRPO over episodes (`env.name=tools`: each call answered by the sandboxed calculator, done at the
   first reply without a call), rewarded by math-verify on the last reply.
Held-out accuracy (greedy, 50 problems never trained on) and the share of episodes that called the
tool: the base model without tools, the SFT model with the tool (before RL), after RL. report.md in
--out has the numbers, the step curves and a few whole episodes.
"""
import argparse
import gc
import json
import random
import time
from pathlib import Path

from align import rl, sft
from align.config import SFTConfig, load_config
from align.rl_config import RLConfig
from align.tools import format_tool_call, get_tool, tool_instructions

NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Ines"]
ITEMS = ["pencils", "stickers", "marbles", "books", "coins", "cookies", "stamps", "apples"]
TEMPLATES = ["{n} packs {a} {item} into each of {b} boxes. How many {item} does {n} pack?",
             "A shop sells {item} in bags of {a}. {n} buys {b} bags. How many {item} does {n} get?",
             "{n} puts {a} {item} on each of {b} shelves. How many {item} are on the shelves?"]
SUFFIX = " Reply with only the final number."
HELDOUT = 50
COMMON = ["log.progress=true", "train.autocast=auto"]


def problems(n: int, seed: int, exclude: set) -> list[dict]:
    """`n` distinct problems (a * b, both 2-digit) whose (a, b) pairs are not in `exclude` (which grows)."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        if (a, b) in exclude:
            continue
        exclude.add((a, b))
        q = rng.choice(TEMPLATES).format(n=rng.choice(NAMES), a=a, b=b, item=rng.choice(ITEMS))
        rows.append({"prompt": q, "answer": str(a * b), "a": a, "b": b})
    return rows


def write_data(out: Path, n_demos: int, n_train: int) -> None:
    """test.jsonl (held out), train.jsonl (RL prompts) and demos.jsonl (SFT conversations), disjoint."""
    seen: set = set()
    test, demos, train = problems(HELDOUT, 1, seen), problems(n_demos, 2, seen), problems(n_train, 3, seen)
    system = tool_instructions([get_tool("calculator")])
    for name, rows in (("test", test), ("train", train)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                                                   for r in rows))
    with open(out / "demos.jsonl", "w") as f:
        for r in demos:
            f.write(json.dumps({"messages": [
                {"role": "system", "content": system}, {"role": "user", "content": r["prompt"] + SUFFIX},
                {"role": "assistant", "content": format_tool_call("calculator", {"expression": f"{r['a']} * {r['b']}"})},
                {"role": "tool", "content": r["answer"]}, {"role": "assistant", "content": r["answer"]}]}) + "\n")


def rl_config(out: Path, model: str, steps: int, *extra: str) -> RLConfig:
    """GRPO over calculator episodes from `model`, held-out eval on test.jsonl."""
    return load_config(RLConfig, None, [
        f"model.name={model}", f"train.output_dir={out / 'grpo'}", f"train.max_steps={steps}",
        f"data.path={out / 'train.jsonl'}", f"data.eval_path={out / 'test.jsonl'}", f"data.eval_size={HELDOUT}",
        f"data.prompt_suffix={SUFFIX!r}", "env.name=tools", "env.tools=[calculator]", "env.max_turns=3",
        "env.max_tokens=160", "rollout.max_new_tokens=48", "rollout.prompts_per_step=8", "rollout.n=4",
        "rollout.temperature=0.8", "rollout.dtype=auto", "train.lr=2e-4", "algorithm.micro_batch_size=16",
        # prompts carry the tool instructions (~200 tokens): a token budget keeps a micro-batch's logits small
        "algorithm.micro_batch_tokens=2048",
        "algorithm.params={loss_agg: token-mean, scale_rewards: batch}", "reward.functions=[{name: math_accuracy}]",
        "reward.accuracy=math_accuracy", *COMMON, *extra])


def without_tools(out: Path) -> dict:
    """Greedy held-out accuracy of the base model answering directly (one turn, no tools)."""
    cfg = rl_config(out, "smollm2-135m-instruct", 0, "env.name=", "train.debug=true",
                    f"train.output_dir={out / 'no_tools'}")
    run = rl.RLRun(cfg)
    try:
        return run.evaluate()
    finally:
        run.close()
        del run
        gc.collect()  # the in-process learner and engine: gigabytes the later stages need


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/tools")
    p.add_argument("--quick", action="store_true", help="a few steps per stage")
    p.add_argument("--rl-steps", type=int, default=8)
    a = p.parse_args()
    out, q, t0, times = Path(a.out), a.quick, time.time(), {}
    out.mkdir(parents=True, exist_ok=True)
    write_data(out, 40 if q else 240, 200)
    base = without_tools(out)
    times["base eval"] = time.time() - t0
    sft.run(load_config(SFTConfig, None, [
        f"data.path={out / 'demos.jsonl'}", "data.eval_fraction=0.1", f"train.output_dir={out / 'sft'}",
        f"train.max_steps={3 if q else 30}", "train.batch_size=8", "train.lr=3e-4", "data.max_length=384",
        "train.save_merged=true", *COMMON]))
    gc.collect()
    times["SFT"] = time.time() - t0 - sum(times.values())
    res = rl.run(rl_config(out, str(out / "sft" / "final"), 2 if q else a.rl_steps, "train.save_final=false"))
    times["GRPO"] = time.time() - t0 - sum(times.values())
    report = write_report(out, base, res, times)
    print("\n" + report)


def write_report(out: Path, base: dict, res: dict, times: dict) -> str:
    """report.md: accuracy and tool use before / after, per-step curves, a few episodes."""
    b, a, h = res["before"], res["after"], res["history"]

    def pct(d: dict, k: str) -> str:
        return f"{d[k]:.0%}" if k in d else "-"

    lines = ["# Calculator tool: SFT -> multi-turn GRPO on SmolLM2-135M-Instruct", "",
             f"- Wall time {sum(times.values()) / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + ")",
             f"- Held-out greedy accuracy ({HELDOUT} problems): base model without tools {pct(base, 'eval/accuracy')}; "
             f"SFT model with the calculator {pct(b, 'eval/accuracy')} -> after {len(h)} GRPO steps {pct(a, 'eval/accuracy')}",
             f"- Episodes that called the tool: {pct(b, 'eval/episode/tool_use_frac')} -> {pct(a, 'eval/episode/tool_use_frac')}; "
             f"tool errors per call {pct(b, 'eval/episode/tool_error_rate')} -> {pct(a, 'eval/episode/tool_error_rate')}; "
             f"turns per episode {b.get('eval/episode/turns', 0):.2f} -> {a.get('eval/episode/turns', 0):.2f}", "",
             "## Per GRPO step", "",
             "| step | reward | accuracy | tool use | tool errors / call | turns | truncated | s/step (generate + env + update) |",
             "|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(h, 1):
        lines.append(f"| {i} | {m['reward']:.2f} | {m.get('accuracy', 0):.2f} | {m['episode/tool_use_frac']:.2f} | "
                     f"{m['episode/tool_error_rate']:.2f} | {m['episode/turns']:.2f} | {m['episode/truncated_frac']:.2f} | "
                     f"{m['time/step']:.1f} ({m['time/generate']:.1f} + {m['time/env']:.1f} + {m['time/update']:.1f}) |")
    eps = sorted((out / "grpo" / "episodes").glob("*.jsonl"))
    if eps:
        lines += ["", f"## Held-out episodes after training ({eps[-1].relative_to(out)})", ""]
        for line in eps[-1].read_text().splitlines()[:3]:
            e = json.loads(line)
            lines.append(f"- reward {e['reward']}: " + " | ".join(f"**{m['role']}**: {m['content']!r}"
                                                                   for m in e["messages"] if m["role"] != "system"))
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
