"""Each online algorithm end to end on a tiny model (debug mode): the weights change and the
algorithm's own metrics are written."""
import json

import pytest
from safetensors.torch import load_file

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
def test_algorithm_runs_end_to_end(tmp_path, model_dir, algo):
    params = {"ppo": "{kl_coef: 0.05}", "rloo": "{kl_coef: 0.05}", "reinforce_pp": "{kl_coef: 0.05}"}.get(algo, "{}")
    cfg = load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "data.train_size=64",
        "data.eval_size=4", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", "train.debug=true", "log.progress=false", "rollout.num_threads=1",
        "train.num_threads=1", "train.lr=1e-2", "peft.r=8", f"algorithm.name={algo}", f"algorithm.params={params}",
        "algorithm.minibatches=2", "reward.functions=[{name: tests/rl_rewards.py:digit_share}]",
        "train.eval_before=false"])
    out = rl.run(cfg)
    lora = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "time/step" in r]
    assert len(steps) == 2
    for key in SPECIFIC[algo]:
        assert key in steps[-1], key
    if algo == "dpo":
        assert steps[-1]["samples_trained"] == 2 * steps[-1]["pairs"]
    if algo == "dupo":
        assert steps[-1]["samples_trained"] == 16  # the batch keeps its size
    if algo == "dapo":
        assert all(r["samples_trained"] == 16 for r in steps)
        assert all(r["samples_generated"] >= 16 for r in steps)
    assert len(out["history"]) == 2
