"""Each online algorithm end to end on a tiny model (debug mode): its own metrics are written and the
reward rises on a task the tiny model can learn (1 when the text starts with a vowel: one early choice;
full fine-tuning, because LoRA on a 2-layer random model barely moves its near-uniform logits)."""
import json

import pytest

from align import rl
from align.config import load_config
from align.rl_config import RLConfig
from align.tiny import save_tiny_model

SPECIFIC = {
    "ppo": ["critic/value_loss", "critic/explained_variance", "critic/vf_clip_frac", "kl_in_reward", "kl_coef"],
    "dapo": ["clip_frac_low", "clip_frac_high", "zero_std_frac", "gen_rounds", "dual_clip_frac"],
    "dupo": ["duplicated_frac", "zero_std_frac"],
    "gspo": ["clip_frac_low", "clip_frac_high", "ratio_mean"],
    "rloo": ["kl", "clip_frac_low"],
    "reinforce_pp": ["kl", "clip_frac_low"],
    "dpo": ["rewards/accuracy", "rewards/margins", "pair_frac", "logps/chosen"],  # online pairs
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("algo", sorted(SPECIFIC))
def test_algorithm_runs_end_to_end_and_the_reward_rises(tmp_path, model_dir, algo):
    params = {"ppo": "{kl_coef: 0.05, adaptive_kl: true}", "rloo": "{kl_coef: 0.05}",
              "reinforce_pp": "{kl_coef: 0.05}"}.get(algo, "{}")
    cfg = load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=6", "data.train_size=64",
        "data.eval_size=4", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
        "rollout.temperature=1.0", "train.debug=true", "log.progress=false", "rollout.num_threads=1",
        "train.num_threads=1", "train.lr=1e-2", "peft.method=full", f"algorithm.name={algo}",
        f"algorithm.params={params}", f"algorithm.minibatches={3 if algo == 'dpo' else 2}",
        "reward.functions=[{name: tests/rl_rewards.py:starts_with_vowel}]", "reward.accuracy=null",
        "train.eval_before=false", "train.save_final=false"])
    out = rl.run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "time/step" in r]
    assert len(steps) == 6 and len(out["history"]) == 6
    for key in SPECIFIC[algo]:
        assert key in steps[-1], key
    rewards = [r["reward"] for r in steps]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards  # the metric moved, not just the weights
    if algo == "dpo":
        assert steps[-1]["samples_trained"] == 2 * steps[-1]["pairs"]
    if algo == "dupo":
        assert steps[-1]["samples_trained"] == 16  # the batch keeps its size
    if algo == "dapo":
        assert all(r["samples_trained"] == 16 for r in steps)
        assert all(r["samples_generated"] >= 16 for r in steps)
    if algo == "ppo":  # the adaptive controller moved beta, and the run carried it from step to step
        assert steps[-1]["kl_coef"] != steps[0]["kl_coef"]
