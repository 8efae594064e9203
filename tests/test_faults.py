"""Surviving crashes: a run killed with SIGKILL and started again with train.resume=true reaches the
same final step with no gap or repeat in metrics.jsonl."""
import json
import os
import signal
import subprocess
import sys
import time

from align.tiny import save_tiny_model

SCRIPT = """
import sys
from align import rl
from align.config import load_config
from align.rl_config import RLConfig
cfg = load_config(RLConfig, None, sys.argv[1:])
rl.run(cfg)
"""


def _args(tmp_path, model_dir, *extra):
    return [f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.steps=5", "train.save_every=1",
            "data.train_size=40", "data.eval_size=4", "rollout.prompts_per_step=2", "rollout.n=4",
            "rollout.max_new_tokens=6", "rollout.temperature=1.0", "train.debug=true", "log.progress=false",
            "rollout.num_threads=1", "train.num_threads=1", "peft.r=8",
            "reward.functions=[{name: tests/rl_rewards.py:slow_digit_share}]", *extra]


def _steps(path):
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:  # the line being written when the process was killed
            pass
    return [r["step"] for r in recs if "time/step" in r]


def test_sigkill_then_resume_continues_the_numbering(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    metrics = tmp_path / "run" / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *_args(tmp_path, model_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_steps(metrics)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _steps(metrics)
    assert 2 <= len(done) < 5, done  # killed mid-run
    out = subprocess.run([sys.executable, "-c", SCRIPT, *_args(tmp_path, model_dir, "train.resume=true")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step" in out.stdout
    assert _steps(metrics) == [1, 2, 3, 4, 5]
