"""How much of a trained LoRA update survives when it is merged into 16-bit weights, as an engine that
serves W0 + scale * B @ A in bf16 or f16 does (the llama.cpp engine's merge sync, the HF engine).

    .venv/bin/python examples/check_bf16_merge.py runs/main/final [more adapter directories ...]

For every LoRA-adapted weight: the delta the engine actually serves, round(W0 + d) - round(W0), against
d itself. Prints the share of elements whose delta vanishes entirely and the relative error
||served - d|| / ||d|| (0: kept exactly; 1: as large as the delta itself), per 16-bit type.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.config import ModelConfig  # noqa: E402
from align.models import load_causal_lm  # noqa: E402


def served_error(adapter_dir: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[float, float]:
    """(share of delta elements lost entirely, relative error of the served delta) for one adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
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


def main() -> None:
    dirs = [Path(p) for p in sys.argv[1:]] or [Path("runs/main/final")]
    base = json.loads((dirs[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = load_causal_lm(ModelConfig(name=base or "smollm2-135m-instruct"))
    weights = {n: p.detach().float() for n, p in model.named_parameters()}
    for d in dirs:
        for dtype in (torch.bfloat16, torch.float16):
            lost, rel = served_error(d, weights, dtype)
            print(f"{d} {str(dtype).removeprefix('torch.')}: delta lost entirely in {lost:.1%} of its elements, "
                  f"relative error of the served delta {rel:.2f}")


if __name__ == "__main__":
    main()
