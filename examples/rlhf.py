"""RLHF from start to end: SFT on demonstrations -> reward model on preference pairs -> PPO with a
critic against that reward model, on the embedded default model and data the project generates.

    .venv/bin/python examples/rlhf.py                   # about 15 minutes on a 2-core CPU
    .venv/bin/python examples/rlhf.py --quick           # a few steps of each stage (smoke run)

Data (align/tasks.py): arithmetic word problems. Demonstrations answer with the calculation
("44 + 22 = 66"); preference pairs prefer that over a wrong result or an evasive reply. Each stage's
output feeds the next: the SFT adapter is merged into a plain model that PPO starts from (with a new
LoRA), and the reward model's final/ directory is the PPO reward. Math-verify accuracy is logged
alongside (weight 0) to show what the learned reward does to correctness. The report at the end
(also written to RUN/report.md) has SFT eval loss, RM held-out accuracy, the PPO reward curve and
sample completions before and after.
"""
import argparse
import json
import random
from pathlib import Path

from align import rl, rm, sft
from align.config import SFTConfig, load_config
from align.models import load_tokenizer, resolve_model
from align.rl_config import RLConfig
from align.tasks import train_and_heldout

SUFFIX = " Answer with the calculation."
EVASIVE = ["I am not sure how to solve this problem.", "That is a tricky question, let me think about it later.",
           "Numbers are fun, but I cannot say.", "It depends on many things."]


def make_data(out: Path, n: int) -> None:
    """Demonstrations and preference pairs as JSONL files in `out`."""
    train, _ = train_and_heldout(n, 50, seed=0, suffix=SUFFIX)  # excludes PPO's 50 held-out questions
    rng = random.Random(7)
    demos, pairs = [], []
    for r in train:
        demos.append({"prompt": r["prompt"], "completion": r["completion"]})
        if rng.random() < 0.5:  # a wrong result in the same form
            a, op, b, _, ans = r["completion"].split()
            rejected = f"{a} {op} {b} = {int(ans) + rng.choice([-1, 1]) * rng.randint(1, 9)}"
        else:
            rejected = rng.choice(EVASIVE)
        pairs.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected})
    for name, rows in (("demos", demos), ("pairs", pairs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/rlhf")
    p.add_argument("--quick", action="store_true", help="a few steps per stage")
    p.add_argument("--rm-breakdown", action="store_true",
                   help="only score the finished reward model in --out by rejection type, then exit")
    a = p.parse_args()
    out = Path(a.out)
    if a.rm_breakdown:
        print("\n".join(rm_breakdown(out / "rm" / "final")))
        return
    out.mkdir(parents=True, exist_ok=True)
    q = a.quick
    make_data(out, 200 if q else 800)
    common = ["log.progress=true", "train.autocast=bfloat16"]

    # 1. SFT on demonstrations (LoRA), then merge the adapter into a plain model for the next stages.
    sft_cfg = load_config(SFTConfig, None, [
        f"data.path={out / 'demos.jsonl'}", "data.eval_fraction=0.1", f"train.output_dir={out / 'sft'}",
        f"train.max_steps={4 if q else 60}", "train.batch_size=8", "train.lr=3e-4", "data.max_length=160",
        "train.save_merged=true", *common])
    s = sft.run(sft_cfg)
    sft_eval = s.result.eval_history[-1]["eval/loss"]
    policy_dir = out / "sft" / "final"  # merged: a plain Hugging Face model

    # 2. Reward model on preference pairs (LoRA on a score head over the SFT model).
    rm_cfg = load_config(rm.RMConfig, None, [
        f"model.name={policy_dir}", f"data.path={out / 'pairs.jsonl'}", "data.eval_fraction=0.1",
        f"train.output_dir={out / 'rm'}", f"train.max_steps={4 if q else 80}", "train.batch_size=8",
        "train.lr=3e-4", "data.max_length=160", *common])
    r = rm.run(rm_cfg)
    rm_acc = r.result.eval_history[-1]["eval/accuracy"]

    # 3. PPO with a critic against the reward model; accuracy logged with weight 0.
    ppo_cfg = load_config(RLConfig, None, [
        f"model.name={policy_dir}", f"train.output_dir={out / 'ppo'}", f"train.max_steps={2 if q else 16}",
        "algorithm.name=ppo", "algorithm.params={kl_coef: 0.05, adaptive_kl: true, lam: 0.95}",
        "algorithm.micro_batch_size=16", "rollout.prompts_per_step=8", "rollout.n=2", "rollout.max_new_tokens=32",
        "rollout.temperature=0.8", "rollout.dtype=bfloat16", "train.lr=1e-4", "critic.lr=2e-4",
        f"critic.model={policy_dir}", "train.autocast=bfloat16", "data.eval_size=50", "log.progress=true",
        f"data.prompt_suffix={SUFFIX!r}",
        f"reward.functions=[{{name: reward_model, kwargs: {{path: '{out / 'rm' / 'final'}'}}}}, "
        "{name: math_accuracy, weight: 0.0}]", "reward.accuracy=math_accuracy"])
    before = _samples(ppo_cfg, policy_dir, None)
    res = rl.run(ppo_cfg)
    after = _samples(ppo_cfg, policy_dir, out / "ppo" / "final")
    curve = [round(h["reward"], 3) for h in res["history"]]
    lines = ["# RLHF run (SFT -> RM -> PPO) on SmolLM2-135M-Instruct", "",
             f"- SFT: eval loss {sft_eval:.3f} after {sft_cfg.train.max_steps} steps",
             f"- Reward model: held-out pairwise accuracy {rm_acc:.1%}",
             f"- PPO reward (reward-model score) per step: {curve}",
             f"- Held-out greedy accuracy (math-verify, not optimised): "
             f"{res['before'].get('eval/accuracy', float('nan')):.1%} before PPO -> "
             f"{res['after'].get('eval/accuracy', float('nan')):.1%} after", *rm_breakdown(out / "rm" / "final"),
             "", "## Samples before / after PPO", ""]
    for (q_, b), (_, c) in zip(before, after):
        lines += [f"- **{q_}**", f"  - before: {b!r}", f"  - after: {c!r}"]
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    print("\n" + report)


def rm_breakdown(rm_dir: Path, n: int = 60) -> list[str]:
    """Report lines: how often the reward model ranks the right calculation above a wrong result,
    and above an evasive reply, on `n` held-out problems (what PPO can learn from it)."""
    from align.rm import RewardModelScorer

    score = RewardModelScorer(rm_dir, num_threads=1)
    _, held = train_and_heldout(800, n, seed=0, suffix=SUFFIX)
    rng = random.Random(3)
    prompts, right, wrong, evasive = [], [], [], []
    for r in held:
        a, op, b, _, ans = r["completion"].split()
        prompts.append(score.tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False))
        right.append(r["completion"])
        wrong.append(f"{a} {op} {b} = {int(ans) + rng.choice([-1, 1]) * rng.randint(1, 9)}")
        evasive.append(rng.choice(EVASIVE))
    s_right, s_wrong, s_evasive = score(prompts, right), score(prompts, wrong), score(prompts, evasive)
    lines = []
    for name, other in (("a wrong result", s_wrong), ("an evasive reply", s_evasive)):
        wins = sum(x > y for x, y in zip(s_right, other)) / n
        margin = sum(x - y for x, y in zip(s_right, other)) / n
        lines.append(f"- Reward model, right calculation above {name}: {wins:.1%} of {n} held-out problems "
                     f"(mean margin {margin:.3f})")
    return lines


def _samples(cfg: RLConfig, base: Path, adapter: Path | None) -> list[tuple[str, str]]:
    """Greedy completions of three held-out questions by the base (or base + adapter) model."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(base)))
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    _, held = train_and_heldout(10, 3, seed=cfg.train.seed, suffix=SUFFIX)
    out = []
    for r in held:
        text = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=32, do_sample=False)
        out.append((r["prompt"][0]["content"], tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    return out


if __name__ == "__main__":
    main()
