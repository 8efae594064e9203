"""The command line: a bad config or data path prints one clear line and exits 2."""
import subprocess
import sys


def _align(*args):
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=120)


def test_unknown_key_exits_2_with_the_fix():
    out = _align("sft", "train.max_step=3")
    assert out.returncode == 2
    assert "unknown config key 'train.max_step'; did you mean 'train.max_steps'?" in out.stderr


def test_missing_data_file_is_named(tmp_path):
    out = _align("rm", f"data.path={tmp_path}/nope.jsonl", f"train.output_dir={tmp_path}/run")
    assert out.returncode == 2
    assert f"data file not found: {tmp_path}/nope.jsonl" in out.stderr


def test_unknown_stage_prints_usage():
    out = _align("fly")
    assert out.returncode == 2 and "usage: align" in out.stderr
