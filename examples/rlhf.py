"""RLHF from start to end: SFT on demonstrations -> reward model on preference pairs -> PPO with a
critic against that reward model, on the embedded default model and data the project generates.

    .venv/bin/python examples/rlhf.py --out runs/rlhf   # about an hour in fp32 on a 2-core CPU (README)
    .venv/bin/python examples/rlhf.py --quick           # a few steps of each stage (smoke run)
    .venv/bin/python examples/rlhf.py --out runs/rlhf --rm-breakdown   # re-score a finished RM

The preference (examples/rlhf_preference.py): on arithmetic word problems that ask for the
calculation, people prefer a reply that then states the result in a full sentence
("44 + 22 = 66. So Tom has 66 apples now.") over the bare calculation ("44 + 22 = 66"). Why a
135M reward model learns it from pairs in minutes: chosen and rejected share the prompt and the
calculation and differ only in a tail that is visible in the tokens (a sentence with a capital
letter, words and a full stop, or nothing), so the score head has a surface feature to read; no
arithmetic is needed (the earlier preference, right vs wrong sums, needed it: that RM never learned
it and PPO's reward stayed flat). Why PPO can move the policy: a quarter of the SFT demonstrations
carry such a sentence, so the SFT policy writes one in some samples, and the choice is one branch
after the result (a full stop or the end of the turn) that the critic's advantages can push.

The held-out measure is the rule the pairs were made from (`states_result`: does the reply end with
a full sentence that names a number with its unit?), computed on the policy's greedy replies to 50
held-out questions (before PPO, half way, after) and on sampled replies before and after. It enters
the PPO run with weight 0, as does math-verify accuracy: both are logged, only the RM score is the
reward (with a per-token KL penalty to the SFT model in it). report.md in --out gathers SFT eval
loss, RM held-out pairwise accuracy (and a breakdown), the RM score, held-out measure, KL and critic
per PPO step, samples before and after, and the PNG curves in ppo/plots/.
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rlhf_preference beside this file
from rlhf_preference import STYLES, SUFFIX, UNSEEN, make_data, sentence, states_result  # noqa: E402

from align import rl, rm, sft  # noqa: E402
from align.config import SFTConfig, load_config  # noqa: E402
from align.device import fast_bf16  # noqa: E402
from align.models import load_tokenizer, resolve_model  # noqa: E402
from align.rl_config import RLConfig  # noqa: E402
from align.tasks import last_number, train_and_heldout  # noqa: E402
from align.tracking import plot_metrics  # noqa: E402

RULE = f"{Path(__file__).resolve().parent / 'rlhf_preference.py'}:states_result"
HELDOUT = 50  # held-out questions (PPO's data.eval_size; SFT and RM data exclude them)
# bf16 autocast and generation are 3x faster than fp32 on CPUs with AVX512-BF16 or AMX and 3x slower
# on CPUs without them (emulated): "auto" takes bf16 only where the device has it
FAST_BF16 = fast_bf16("cpu")
COMMON = ["log.progress=true", "train.autocast=auto"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/rlhf")
    p.add_argument("--quick", action="store_true", help="a few steps per stage")
    p.add_argument("--rm-breakdown", action="store_true",
                   help="only score the finished reward model in --out on held-out variants, then exit")
    a = p.parse_args()
    out, q, t0 = Path(a.out), a.quick, time.time()
    if a.rm_breakdown:
        print("\n".join(rm_breakdown(out / "rm" / "final")))
        return
    out.mkdir(parents=True, exist_ok=True)
    make_data(out, 200 if q else 800)
    times = {}

    # 1. SFT on demonstrations (LoRA), then merge the adapter into a plain model for the next stages.
    sft_cfg = load_config(SFTConfig, None, [
        f"data.path={out / 'demos.jsonl'}", "data.eval_fraction=0.1", f"train.output_dir={out / 'sft'}",
        f"train.max_steps={4 if q else 40}", "train.batch_size=8", "train.lr=3e-4", "data.max_length=160",
        "train.save_merged=true", *COMMON])
    sft_eval = sft.run(sft_cfg).result.eval_history[-1]["eval/loss"]
    policy_dir = out / "sft" / "final"  # merged: a plain Hugging Face model
    times["SFT"] = time.time() - t0

    # 2. Reward model on preference pairs (LoRA on a score head over the SFT model).
    rm_cfg = load_config(rm.RMConfig, None, [
        f"model.name={policy_dir}", f"data.path={out / 'pairs.jsonl'}", "data.eval_fraction=0.1",
        f"train.output_dir={out / 'rm'}", f"train.max_steps={4 if q else 30}", "train.batch_size=8",
        "train.lr=3e-4", "data.max_length=160", *COMMON])
    rm_acc = rm.run(rm_cfg).result.eval_history[-1]["eval/accuracy"]
    breakdown = rm_breakdown(out / "rm" / "final", 20 if q else 60)
    times["reward model"] = time.time() - t0 - sum(times.values())

    # 3. PPO with a critic against the reward model; the rule and math accuracy logged with weight 0.
    ppo_cfg = ppo_config(out, steps=2 if q else 20)
    n = 8 if q else HELDOUT
    before = heldout_replies(ppo_cfg, policy_dir, None, n)
    res = rl.run(ppo_cfg)
    after = heldout_replies(ppo_cfg, policy_dir, out / "ppo" / "final", n)
    times["PPO"] = time.time() - t0 - sum(times.values())
    plots = plot_metrics(out / "ppo" / "metrics.jsonl", out / "ppo" / "plots", {
        "rm_score": ["reward/reward_model/mean", "eval/reward"],
        "preference": ["reward/states_result/mean", "eval/accuracy", "reward/math_accuracy/mean"],
        "kl": ["kl_in_reward", "kl_coef"], "critic": ["critic/explained_variance"]})
    report = write_report(out, sft_eval, sft_cfg.train.max_steps, rm_acc, breakdown, res, before, after,
                          plots, times)
    print("\n" + report)


def ppo_config(out: Path, steps: int, *overrides: str) -> RLConfig:
    """PPO from the SFT model in `out` with a critic, rewarded by the reward model in `out`; the
    rule and math-verify accuracy ride along with weight 0 (logged per step and on held-out)."""
    policy_dir = out / "sft" / "final"
    return load_config(RLConfig, None, [
        f"model.name={policy_dir}", f"train.output_dir={out / 'ppo'}", f"train.max_steps={steps}",
        f"train.eval_every={max(steps // 2, 1)}", "algorithm.name=ppo",
        "algorithm.params={kl_coef: 0.05, adaptive_kl: true, target_kl: 0.1, kl_horizon: 500, lam: 0.95}",
        "algorithm.micro_batch_size=16", "rollout.prompts_per_step=8", "rollout.n=2", "rollout.max_new_tokens=32",
        "rollout.temperature=0.8", "train.lr=2e-4", "critic.lr=2e-4", f"critic.model={policy_dir}",
        f"data.eval_size={HELDOUT}", f"data.prompt_suffix={SUFFIX!r}",
        f"reward.functions=[{{name: reward_model, kwargs: {{path: '{out / 'rm' / 'final'}'}}}}, "
        f"{{name: '{RULE}', weight: 0.0}}, {{name: math_accuracy, weight: 0.0}}]", "reward.accuracy=states_result",
        "rollout.dtype=auto", *COMMON, *overrides])


def write_report(out: Path, sft_eval: float, sft_steps: int, rm_acc: float, breakdown: list[str], res: dict,
                 before: dict, after: dict, plots: list[Path], times: dict[str, float]) -> str:
    """report.md in `out`: each stage's numbers, the PPO curves per step, samples before / after."""
    h = res["history"]

    def per_step(key: str, fmt: str = "{:.3f}") -> str:
        return ", ".join(fmt.format(m[key]) if key in m else "-" for m in h)

    def first_last(key: str) -> str:
        xs = [m[key] for m in h if key in m]
        k = min(3, len(xs))
        return f"{sum(xs[:k]) / k:.3f} -> {sum(xs[-k:]) / k:.3f} (mean of the first / last {k} steps)" if xs else "-"

    mid = [m for m in h if "eval/accuracy" in m]
    greedy = [res["before"].get("eval/accuracy"), *(m["eval/accuracy"] for m in mid), res["after"].get("eval/accuracy")]
    rm_eval = [res["before"].get("eval/reward"), *(m["eval/reward"] for m in mid), res["after"].get("eval/reward")]
    kls = [m["kl_in_reward"] for m in h if "kl_in_reward" in m]
    lines = [
        "# RLHF run (SFT -> RM -> PPO) on SmolLM2-135M-Instruct", "",
        "Preference: after the calculation, state the result in a full sentence (rule: examples/rlhf_preference.py "
        "`states_result`, never part of the PPO reward).", "",
        f"- Wall time: {sum(times.values()) / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + f"); bf16: {'yes' if FAST_BF16 else 'no (fp32)'}",
        f"- SFT: eval loss {sft_eval:.3f} after {sft_steps} steps",
        f"- Reward model: held-out pairwise accuracy {rm_acc:.1%}", *breakdown,
        f"- PPO: {len(h)} steps of {h[0]['samples_generated'] if h else 0} samples; RM score of the samples "
        f"{first_last('reward/reward_model/mean')}",
        "- Held-out measure (share of replies to the held-out questions that state the result in a sentence): "
        f"greedy {' -> '.join(_pct(x) for x in greedy)} (before, half way, after PPO); sampled at T=0.8 "
        f"{_pct(before['sampled'])} -> {_pct(after['sampled'])} (of {before['n_sampled']} replies)",
        f"- RM score of the greedy held-out replies: {' -> '.join(f'{x:.3f}' for x in rm_eval if x is not None)}",
        f"- Math-verify accuracy of greedy held-out replies (weight 0): {_pct(before['math'])} -> {_pct(after['math'])}",
        f"- KL to the SFT model in the reward, per step: {min(kls):.4f} .. {max(kls):.4f}" if kls else "- KL: -",
        f"- Critic explained variance: {first_last('critic/explained_variance')}", "",
        "## Per PPO step", "",
        f"- RM score (mean of the samples): {per_step('reward/reward_model/mean')}",
        f"- share of samples stating the result (rule, weight 0): {per_step('reward/states_result/mean', '{:.2f}')}",
        f"- math accuracy of the samples (weight 0): {per_step('reward/math_accuracy/mean', '{:.2f}')}",
        f"- KL in the reward: {per_step('kl_in_reward', '{:.4f}')}",
        f"- KL coefficient: {per_step('kl_coef', '{:.4f}')}",
        f"- critic explained variance: {per_step('critic/explained_variance', '{:.2f}')}",
        f"- response length (tokens): {per_step('response_length/mean', '{:.1f}')}", "",
        "Curves: " + ", ".join(f"![{p.stem}]({p.relative_to(out)})" for p in plots), "",
        "## Greedy replies to held-out questions before / after PPO", ""]
    for (q_, b), (_, c) in list(zip(before["greedy"], after["greedy"]))[:5]:
        lines += [f"- **{q_}**", f"  - before: {b!r}", f"  - after: {c!r}"]
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    return report


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def rm_breakdown(rm_dir: Path, n: int = 60) -> list[str]:
    """Report lines: how often the reward model prefers a reply that states the result in a sentence
    over the bare calculation on `n` held-out questions, with the training styles and with a style
    it never saw, and whether it cares about the number in the sentence (it was never taught to)."""
    from align.rm import RewardModelScorer

    score = RewardModelScorer(rm_dir, num_threads=0)
    _, held = train_and_heldout(800, n, seed=0, suffix=SUFFIX)
    rng = random.Random(3)
    prompts, bare, seen, unseen, wrong = [], [], [], [], []
    for r in held:
        q, calc, ans = r["prompt"][0]["content"], r["completion"], r["answer"]
        style = rng.choice(STYLES)
        prompts.append(score.tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False))
        bare.append(calc)
        seen.append(f"{calc}. {sentence(q, ans, style)}")
        unseen.append(f"{calc}. {sentence(q, ans, UNSEEN)}")
        wrong.append(f"{calc}. {sentence(q, str(int(ans) + rng.choice([-1, 1]) * rng.randint(1, 9)), style)}")
    s_bare, s_seen, s_unseen, s_wrong = (score(prompts, x) for x in (bare, seen, unseen, wrong))
    lines = []
    for name, hi, lo in (("a sentence (training styles) above the bare calculation", s_seen, s_bare),
                         ("a sentence in a style it never saw above the bare calculation", s_unseen, s_bare),
                         ("a sentence with the right number above one with a wrong number", s_seen, s_wrong)):
        wins = sum(x > y for x, y in zip(hi, lo)) / n
        margin = sum(x - y for x, y in zip(hi, lo)) / n
        lines.append(f"- Reward model, {name}: {wins:.1%} of {n} held-out questions (mean margin {margin:.3f})")
    return lines


def heldout_replies(cfg: RLConfig, base: Path, adapter: Path | None, n: int) -> dict:
    """The base (or base + adapter) model on the first `n` held-out questions: greedy replies (with
    their math accuracy) and the rule's share among two sampled replies each at the rollout temperature."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(cfg.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(base)))
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    _, held = train_and_heldout(10, n, seed=cfg.train.seed, suffix=SUFFIX)  # PPO's held-out questions
    torch.manual_seed(0)
    greedy, sampled = [], []
    for i in range(0, n, 25):
        rows = held[i:i + 25]
        texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            for do_sample, k, dest in ((False, 1, greedy), (True, 2, sampled)):
                gen = model.generate(**enc, max_new_tokens=cfg.rollout.max_new_tokens, do_sample=do_sample,
                                     temperature=cfg.rollout.temperature if do_sample else None, top_p=None,
                                     top_k=None, num_return_sequences=k, pad_token_id=tok.pad_token_id)
                dest += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"greedy": [(r["prompt"][0]["content"], g) for r, g in zip(held, greedy)],
            "sampled": sum(states_result([], sampled)) / len(sampled), "n_sampled": len(sampled),
            "math": sum(last_number(g) == r["answer"] for r, g in zip(held, greedy)) / n}


if __name__ == "__main__":
    main()
