"""DeepSpeed ZeRO-2 / ZeRO-3 through the `align rl` config (train.zero_stage): two data-parallel
learners (Ray actors, gloo) take the steps one plain learner takes, and a run resumed from a ZeRO
checkpoint (every rank's optimizer partition) reaches the parameters of the uninterrupted run.
No DeepSpeed op is compiled on CPUs (align.learners marks the shared-memory inference op unused)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align import rl
from align.config import load_config
from align.rl_config import RLConfig
from align.tiny import save_tiny_model


def _cfg(out, model_dir, *extra):
    return load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={out}", "train.max_steps=2", "data.train_size=40",
        "data.eval_size=4", "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", "log.progress=false", "rollout.num_threads=1", "train.num_threads=1",
        "train.lr=1e-2", "peft.r=8", "reward.functions=[{name: tests/rl_rewards.py:digit_share}]",
        "reward.accuracy=null", "train.eval_before=false", "train.save_every=1", "train.keep_checkpoints=3",
        "algorithm.micro_batch_size=2", *extra])


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "step-2" / "weights.safetensors"))


def _losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One plain learner (no ZeRO): the reference run."""
    tmp = tmp_path_factory.mktemp("zero")
    model_dir = save_tiny_model(tmp / "tiny")
    rl.run(_cfg(tmp / "plain", model_dir))
    return tmp, model_dir, _weights(tmp / "plain"), _losses(tmp / "plain")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_from_config_matches_plain_and_resumes_exactly(plain, stage):
    tmp, model_dir, want, want_losses = plain
    out = tmp / f"zero{stage}"
    cfg = _cfg(out, model_dir, f"train.zero_stage={stage}", "train.num_learners=2")
    rl.run(cfg)
    got = _weights(out)
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if "lora_B" in k)  # the steps happened
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-4), (k, (got[k] - want[k]).abs().max())
    # two ranks each report their share of the loss (gradients are averaged): compare the curve shape
    assert [s for s, _ in _losses(out)] == [s for s, _ in want_losses]

    # resume: the same run cut after step 1, continued from the step-1 ZeRO checkpoint
    cut = tmp / f"zero{stage}-resumed"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step-2")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 1))
    cfg = _cfg(cut, model_dir, f"train.zero_stage={stage}", "train.num_learners=2", "train.resume=true")
    rl.run(cfg)
    resumed = _weights(cut)
    for k in got:
        assert torch.equal(resumed[k], got[k]), (k, (resumed[k] - got[k]).abs().max())


def test_zero2_keeps_loraplus_groups(plain):
    """LoRA+ (peft.loraplus_lr_ratio): DeepSpeed builds its optimizer from the learner's parameter
    groups, so the B matrices keep their own lr: ZeRO-2 equals the plain learner, and both differ
    from the run with one lr."""
    tmp, model_dir, one_lr, _ = plain
    rl.run(_cfg(tmp / "plus", model_dir, "peft.loraplus_lr_ratio=4"))
    want = _weights(tmp / "plus")
    assert max((want[k] - one_lr[k]).abs().max() for k in want if "lora_B" in k) > 1e-3
    rl.run(_cfg(tmp / "plus-zero2", model_dir, "peft.loraplus_lr_ratio=4", "train.zero_stage=2", "train.num_learners=2"))
    got = _weights(tmp / "plus-zero2")
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-4), (k, (got[k] - want[k]).abs().max())
