"""How much of a trained LoRA update survives when it is merged into 16-bit weights, as an engine that
serves W0 + scale * B @ A in bf16 or f16 does (the llama.cpp engine's merge sync, the HF engine).

    .venv/bin/python examples/check_bf16_merge.py runs/main/final [more adapter directories ...] [--scale 0.05]

For every LoRA-adapted weight: the delta the engine actually serves, round(W0 + d) - round(W0), against
d itself. Prints the share of elements whose delta vanishes entirely and the relative error
||served - d|| / ||d|| (0: kept exactly; 1: as large as the delta itself), per 16-bit type.

Then what a bf16 HF engine (LoRA merged into its weights) serves: on the run's own samples
(samples/step_*.jsonl beside the adapter), the change of each completion token's log-prob that the
adapter makes, against the same change in float32. "kept" is the projection onto the float32 change
(1 = all of it, on average), "error" the relative error. `--scale s` multiplies every lora_B by s
first: an update the size of the first steps' (the delta grows over a run from zero).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.config import ModelConfig  # noqa: E402
from align.models import load_causal_lm, load_tokenizer  # noqa: E402


def served_error(adapter_dir: Path, tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> tuple[float, float]:
    """(share of delta elements lost entirely, relative error of the served delta) for one adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lost = total = 0
    err = norm = 0.0
    for key, a in tensors.items():
        if "lora_A" not in key:
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        w0 = weights[key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")]
        d = scale * (b.float() @ a.float())
        served = (w0 + d).to(dtype).float() - w0.to(dtype).float()
        lost += int(((served == 0) & (d != 0)).sum())
        total += d.numel()
        err += float((served - d).pow(2).sum())
        norm += float(d.pow(2).sum())
    return lost / total, (err / norm) ** 0.5


def served_shift(adapter_dir: Path, tensors: dict[str, torch.Tensor], model, tokenizer, n: int = 32) -> None:
    """Print how much of the adapter's float32 log-prob change a bf16 HF engine keeps."""
    from rollout import HFEngine

    files = sorted((adapter_dir.parent / "samples").glob("step_*.jsonl"))
    if not files:
        return
    rows = [json.loads(line) for line in files[-1].read_text().splitlines()][:n]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())

    def change(engine) -> torch.Tensor:
        """Completion-token log-probs with the adapter minus without, concatenated over the rows."""
        out = []
        for lora in ({}, tensors):
            engine.update_lora(lora, cfg)
            lps = []
            for r in rows:
                p = tokenizer(r["prompt"])["input_ids"]
                c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + c])
                with torch.no_grad():
                    lp = torch.log_softmax(engine.model(input_ids=ids).logits[0, :-1].float(), -1)
                lps.append(lp.gather(-1, ids[0, 1:, None])[len(p) - 1:, 0])
            out.append(torch.cat(lps))
        return out[1] - out[0]

    want = change(HFEngine(model, tokenizer, dtype="float32"))
    got = change(HFEngine(model, tokenizer, dtype="bfloat16"))
    kept = float((got * want).sum() / (want * want).sum())
    print(f"{adapter_dir} bf16 HF engine: kept {kept:.2f} of the float32 log-prob change on {len(rows)} "
          f"samples' completions, relative error {float((got - want).norm() / want.norm()):.2f}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="How much of a LoRA update a 16-bit engine serves.")
    parser.add_argument("dirs", nargs="*", type=Path, default=[Path("runs/main/final")], help="adapter directories")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every lora_B by this first")
    args = parser.parse_args()
    dirs, factor = args.dirs, args.scale
    base = json.loads((dirs[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    model_cfg = ModelConfig(name=base or "smollm2-135m-instruct")
    model = load_causal_lm(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    weights = {n: p.detach().float() for n, p in model.named_parameters()}
    for d in dirs:
        tensors = {k: v * factor if "lora_B" in k else v
                   for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
        for dtype in (torch.bfloat16, torch.float16):
            lost, rel = served_error(d, tensors, weights, dtype)
            print(f"{d} {str(dtype).removeprefix('torch.')}: delta lost entirely in {lost:.1%} of its elements, "
                  f"relative error of the served delta {rel:.2f}")
        served_shift(d, tensors, model, tokenizer)


if __name__ == "__main__":
    main()
