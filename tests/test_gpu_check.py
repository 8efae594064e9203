"""The GPU check's in-process path runs on a machine without Ray, vLLM, DeepSpeed, datasets, wandb,
math-verify, gguf or bitsandbytes (the bare GPU machine): here on the CPU with a tiny model and
those packages hidden, it completes every section and names what it skipped."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Hide the packages from imports and from importlib.util.find_spec, as if they were not installed.
_HIDE = """
import importlib.abc, importlib.util, runpy, sys
HIDDEN = {"ray", "vllm", "deepspeed", "datasets", "wandb", "math_verify", "gguf", "bitsandbytes"}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in HIDDEN else _find(name, package)
sys.argv = ["gpu_check.py"] + sys.argv[1:]
runpy.run_path("examples/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_runs_without_the_optional_stack(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-c", _HIDE, "--quick", "--device", "cpu", "--skip-tests", "--steps", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["skipped_packages"]) >= {"ray", "vllm", "deepspeed", "datasets", "wandb", "math_verify"}
    assert report["grpo_vllm"] == {"skipped": "vLLM is not installed"}
    grpo = report["grpo_hf"]
    assert grpo["reward"] == "number_match" and grpo["s_per_step"] > 0 and grpo["gen_tokens_per_s"] > 0
    for stage in ("sft", "dpo"):
        assert report[stage]["steps"] == 2 and report[stage]["tokens_per_s"] > 0, report[stage]
    assert "grpo_hf" in (out / "report.md").read_text()
