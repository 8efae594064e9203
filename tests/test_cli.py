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


def test_preference_stage_trains_from_the_command_line(tmp_path):
    from align.tiny import save_tiny_model
    from conftest import write_jsonl

    model = save_tiny_model(tmp_path / "tiny")
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = _align("preference", "examples/preference.yaml", f"model.name={model}", f"data.path={data}",
                 "data.eval_fraction=0.25", f"train.output_dir={tmp_path}/run", "train.max_steps=2",
                 "train.batch_size=2", "train.autocast=none", "log.progress=false", "log.plot=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out reward accuracy" in out.stdout
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_sweep_bad_base_key_exits_2(tmp_path):
    out = _align("sweep", "examples/sweep_preference.yaml", "base.train.lrr=1.0e-4",
                 f"output_dir={tmp_path}/sweep")
    assert out.returncode == 2
    assert "unknown config key 'train.lrr'" in out.stderr, out.stderr
