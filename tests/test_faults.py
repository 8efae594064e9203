"""Surviving crashes: a run killed with SIGKILL at a random moment and started again with
train.resume=true reaches the parameters (policy and critic) and the metrics of an uninterrupted run,
bit for bit, for GRPO, PPO (critic and adaptive KL), DUPO (random duplicates) and DAPO (refill rounds),
with no step's line in metrics.jsonl lost or written twice."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from align import rl
from align.config import load_config
from align.rl_config import RLConfig
from align.tiny import save_tiny_model

SCRIPT = """
import sys
from align import rl
from align.config import load_config
from align.rl_config import RLConfig
rl.run(load_config(RLConfig, None, sys.argv[1:]))
"""
PARAMS = {"grpo": "{}", "ppo": "{kl_coef: 0.05, adaptive_kl: true, target_kl: 0.01, kl_horizon: 100}",
          "dupo": "{}", "dapo": "{max_gen_rounds: 2}"}
STEPS = 3


def _args(out, model_dir, algo, *extra):
    return [f"model.name={model_dir}", f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.save_every=1",
            "data.train_size=40", "data.eval_size=4", "rollout.prompts_per_step=2", "rollout.n=4",
            "rollout.max_new_tokens=6", "rollout.temperature=1.0", "train.debug=true", "log.progress=false",
            "rollout.num_threads=1", "train.num_threads=1", "peft.r=8", "train.lr=1e-2", "train.eval_before=false",
            f"algorithm.name={algo}", f"algorithm.params={PARAMS[algo]}", "reward.accuracy=null",
            "reward.functions=[{name: tests/rl_rewards.py:slow_starts_with_vowel}]", *extra]


def _records(path):
    recs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:  # the line being written when the process was killed
            pass
    return [r for r in recs if "time/step" in r]


def _comparable(rec):
    """A step's metrics without the wall-clock ones."""
    return {k: v for k, v in rec.items()
            if not (k == "time" or k.startswith("time/") or k == "gen_tokens_per_s" or k.endswith("/seconds"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("algo", sorted(PARAMS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, model_dir, algo):
    rl.run(load_config(RLConfig, None, _args(tmp_path / "whole", model_dir, algo)))
    want = _records(tmp_path / "whole" / "metrics.jsonl")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *_args(tmp_path / "cut", model_dir, algo)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_records(metrics)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)  # somewhere inside step 2: generating, scoring, updating, logging or saving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_records(metrics)) < STEPS, "the run finished before it was killed"
    out = subprocess.run([sys.executable, "-c", SCRIPT, *_args(tmp_path / "cut", model_dir, algo, "train.resume=true")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = _records(metrics)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no gap, no repeat
    for g, w in zip(got, want):
        assert _comparable(g) == _comparable(w), g["step"]
    a = load_file(str(tmp_path / "whole" / "checkpoints" / f"step-{STEPS}" / "weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / f"step-{STEPS}" / "weights.safetensors"))
    assert a.keys() == b.keys() and (algo != "ppo" or any(k.startswith("critic/") for k in a))
    for k in a:
        assert torch.equal(a[k], b[k]), k
