"""Data parallelism of the offline stages under torchrun: SFT (full fine-tuning), reward model,
DPO (sigmoid) and KTO on 2 processes with train.batch_size=2 take exactly the steps of one process
with batch_size=4 (final weights and the logged loss of every step equal up to summation order),
the weights moved, rank 0 alone wrote the run directory, and two processes resume exactly.

The data sizes put each process-splitting case in one stage: SFT's last micro-batch holds one
example (rank 1 runs a zero-weight placeholder), the reward model's two (one each), DPO's batches
are full, and KTO's reference point z0 is a mean over both processes' mismatched pairs.

This file is also the script torchrun runs (`python tests/test_offline_dp.py ROOT WORLD` runs every
stage through align.cli), so the stages load the tiny model from a saved directory.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from align import cli

ROOT = Path(__file__).resolve().parents[1]
COMBINED = 4  # examples per combined micro-batch: one process with 4, or two processes with 2 each
STEPS = 3
WORDS = "cat dog red blue green yes no the quick fox".split()
STAGES = {  # name: (stage, train rows, eval rows, extra overrides)
    # constant lr, so that a run of 2 steps resumed to 3 takes the same steps as a run of 3
    "sft": ("sft", 9, 5, ["peft.method=full", "train.lr=1e-3", "train.scheduler=constant"]),
    "rm": ("rm", 10, 3, ["peft.method=lora", "train.lr=1e-2"]),
    "dpo": ("preference", 12, 6, ["peft.method=lora", "train.lr=1e-2", "algorithm.name=dpo"]),
    # lr 7e-3: z0 turns positive (exercised) while Adam's amplification of float noise in the
    # mismatched pairs' log-probs (padded differently per process) stays far below 1e-5
    "kto": ("preference", 5, 2, ["peft.method=lora", "train.lr=7e-3", "algorithm.name=kto"]),
}


def _rows(stage: str, n: int, seed: int) -> list[dict]:
    """SFT prompt / completion rows, or preference pairs whose chosen and rejected differ in length."""
    out = []
    for i in range(n):
        q = " ".join(WORDS[(seed + i * k) % len(WORDS)] for k in range(1, 2 + i % 4))
        if stage == "sft":
            out.append({"prompt": f"What is {i} + {seed}?", "completion": f"The answer is {i + seed}. {q}"})
        else:
            out.append({"prompt": f"Tell me about {q}", "chosen": f"good {q}", "rejected": f"bad {WORDS[i % 10]}"})
    return out


def _write_inputs(root: Path) -> None:
    """The tiny model and every stage's train / eval files."""
    from align.tiny import save_tiny_model

    save_tiny_model(root / "model")
    for name, (stage, n_train, n_eval, _) in STAGES.items():
        for split, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
            rows = _rows(stage, n, seed)
            (root / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _args(root: Path, name: str, world: int) -> list[str]:
    """Overrides of stage `name` for `world` processes (batch_size per process)."""
    stage, _, _, extra = STAGES[name]
    return [f"model.name={root / 'model'}", f"data.path={root / f'{name}-train.jsonl'}",
            f"data.eval_path={root / f'{name}-eval.jsonl'}", f"train.output_dir={root / f'{name}-{world}'}",
            f"train.batch_size={COMBINED // world}", f"train.max_steps={STEPS}", "train.warmup_ratio=0",
            "train.num_threads=1", "train.device=cpu", "log.progress=false", "log.plot=false", "peft.r=4", *extra]


def _run_all(root: Path, world: int) -> None:
    """Every stage, as `align STAGE key=value ...` would run it (one process group for all)."""
    for name, (stage, *_) in STAGES.items():
        cli.STAGES[stage](_args(root, name, world))


def _resume_sft(root: Path, world: int) -> None:
    """SFT for 2 steps, then resumed by every process to 3 (sft-resume-WORLD)."""
    args = [*_args(root, "sft", world), f"train.output_dir={root / f'sft-resume-{world}'}"]
    cli.STAGES["sft"]([*args, "train.max_steps=2"])
    cli.STAGES["sft"]([*args, "train.resume=true"])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / "final").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval/loss" in r]


def test_two_processes_take_the_steps_of_one_with_the_combined_batch(tmp_path):
    _write_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    from align.device import free_port

    t0 = time.perf_counter()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", __file__, str(tmp_path), "2"]
    proc = subprocess.Popen(launch, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _run_all(tmp_path, 1)  # the single-process runs, here, while the two processes start
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-6000:]
    print(f"two-process runs + single-process runs: {time.perf_counter() - t0:.1f} s")

    from align.tiny import tiny_model

    initial = tiny_model()[0].state_dict()
    for name in STAGES:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        w1, w2 = _weights(one), _weights(two)
        assert w1.keys() == w2.keys(), name
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=lambda m: f"{name} {k}: {m}")
        if name == "sft":  # full fine-tuning: every weight of the saved model against the initial model
            moved = max((w1[k] - initial[k]).abs().max().item() for k in w1)
        else:  # LoRA: B starts at zero
            moved = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)
        assert moved > 1e-3, (name, moved)
        (train1, eval1), (train2, eval2) = _records(one), _records(two)
        assert [r["step"] for r in train2] == list(range(1, STEPS + 1)), f"{name}: rank 1 wrote metrics too?"
        assert len(eval2) == len(eval1) == 1, name
        for key in ("loss", "grad_norm", "rewards/accuracy", "kl", "accuracy"):
            a, b = [r.get(key) for r in train1], [r.get(key) for r in train2]
            assert (a[0] is None) == (b[0] is None), (name, key)
            if a[0] is not None:
                assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (name, key, a, b)
        assert abs(eval1[0]["eval/loss"] - eval2[0]["eval/loss"]) < 1e-5, (name, eval1, eval2)
        assert train1[0]["loss"] != train1[-1]["loss"], name  # the metric moved
        if name == "kto":  # the reference point z0 (logged as kl) is a mean over both processes' pairs
            assert max(r["kl"] for r in train2) > 1e-3, train2
    # two processes stopped after step 2 and resumed from rank 0's checkpoint finish where one process does
    assert out.count("resumed from step 2") == 1, out[-3000:]
    resumed = _weights(tmp_path / "sft-resume-2")
    for k, w in _weights(tmp_path / "sft-1").items():
        torch.testing.assert_close(resumed[k], w, atol=1e-5, rtol=0)
    assert [r["step"] for r in _records(tmp_path / "sft-resume-2")[0]] == list(range(1, STEPS + 1))


if __name__ == "__main__":  # under torchrun: every stage on this process's share of each batch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    _run_all(Path(sys.argv[1]), int(sys.argv[2]))
    _resume_sft(Path(sys.argv[1]), int(sys.argv[2]))
    from align import distributed

    distributed.shutdown()
